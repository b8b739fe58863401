#!/bin/bash
# Run from the repository root after `source scripts/env.sh && cargo build --release -p rabbit-cli`;
# the model: `rabbit synth --arch qwen2 --preset qwen2.5-1.5b --shards 4 --out /tmp/b15`.
# Time to first token from a fresh download (checkpoint just written: in the page cache; and
# cold on disk), split (made from scratch, its cost included) vs in place. 3 rounds.
R=${RABBIT:-$CARGO_TARGET_DIR/release/rabbit}
M=${MODEL:-/tmp/b15}
S=${SPLIT:-/tmp/b15-split}
OUT=${OUT:-/tmp/rabbit-in-place}
mkdir -p $OUT
evict() { python3 -c "
import os,sys,glob
for p in glob.glob(sys.argv[1]+'/*.safetensors'):
    fd=os.open(p,os.O_RDONLY); os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED); os.close(fd)
" "$1"; }
ids=$(python3 -c "print(','.join(str(i*37%150000+1) for i in range(32)))")
for round in 1 2 3; do
  for state in hot cold; do
    for mode in split nosplit; do
      rm -rf $S; sync
      evict $M
      [ $state = hot ] && cat $M/*.safetensors > /dev/null
      if [ $mode = split ]; then extra="--split-dir $S"; else extra="--no-split"; fi
      s=$(date +%s.%N)
      $R generate --model $M --device cpu --max-new-tokens 1 --input-ids $ids --resident-layers 0 $extra --json > /dev/null 2>&1
      e=$(date +%s.%N)
      echo "ttft $state $mode $round $(echo "$e - $s" | bc)" | tee -a $OUT/ttft.txt
    done
  done
done
rm -rf $S
echo done >> $OUT/ttft.txt
