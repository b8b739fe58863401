#!/bin/bash
# Run from the repository root after `source scripts/env.sh && cargo build --release -p rabbit-cli`;
# the model: `rabbit synth --arch qwen2 --preset qwen2.5-1.5b --shards 4 --out /tmp/b15`.
# Issue 19 sitting: split vs --no-split on the qwen2.5-1.5b shape (bf16, 4 shards), CPU, 2 threads.
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
# Time to first token from a fresh download: checkpoint in the page cache, no split yet.
rm -rf $S
for mode in split nosplit; do
  evict $M; cat $M/*.safetensors > /dev/null
  if [ $mode = split ]; then extra="--split-dir $S"; else extra="--no-split"; fi
  s=$(date +%s.%N)
  $R generate --model $M --device cpu --max-new-tokens 1 --input-ids $ids --resident-layers 0 $extra --json > $OUT/ttft-$mode.json 2>/dev/null
  e=$(date +%s.%N)
  echo "ttft_hot $mode $(echo "$e - $s" | bc)" | tee -a $OUT/summary.txt
done
# Same, checkpoint cold on disk (split reused for the split case is not fair: redo it).
rm -rf $S
for mode in split nosplit; do
  evict $M
  if [ $mode = split ]; then extra="--split-dir $S"; else extra="--no-split"; fi
  s=$(date +%s.%N)
  $R generate --model $M --device cpu --max-new-tokens 1 --input-ids $ids --resident-layers 0 $extra --json > $OUT/ttftcold-$mode.json 2>/dev/null
  e=$(date +%s.%N)
  echo "ttft_cold $mode $(echo "$e - $s" | bc)" | tee -a $OUT/summary.txt
done
# Decode: page cache, interleaved, 3 rounds.
cat $M/*.safetensors $S/*.safetensors > /dev/null
for round in 1 2 3; do
  for mode in split nosplit; do
    if [ $mode = split ]; then extra="--split-dir $S"; else extra="--no-split"; fi
    $R bench --model $M --device cpu --resident-layers 0 --new-tokens 8 --repeat 3 --no-baseline --json $extra > $OUT/warm-$mode-$round.json 2>/dev/null
    python3 -c "import json,sys; v=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print('warm', sys.argv[2], sys.argv[3], v['decode_s_per_token'], v['bytes_streamed_per_token'], v['read_bytes_per_s'])" $OUT/warm-$mode-$round.json $mode $round | tee -a $OUT/summary.txt
  done
done
# Decode from disk: --cold (pages dropped after use) and --direct-io, 2 rounds.
for round in 1 2; do
  for flag in --cold --direct-io; do
    for mode in split nosplit; do
      if [ $mode = split ]; then extra="--split-dir $S"; else extra="--no-split"; fi
      evict $M; evict $S
      $R bench --model $M --device cpu --resident-layers 0 --new-tokens 8 --repeat 3 --no-baseline --json $flag $extra > $OUT/cold$flag-$mode-$round.json 2>/dev/null
      python3 -c "import json,sys; v=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print('disk', sys.argv[4], sys.argv[2], sys.argv[3], v['decode_s_per_token'], v['bytes_streamed_per_token'], v['read_bytes_per_s'])" $OUT/cold$flag-$mode-$round.json $mode $round $flag | tee -a $OUT/summary.txt
    done
  done
done
echo done | tee -a $OUT/summary.txt
