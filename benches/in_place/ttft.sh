#!/bin/bash
# Run from the repository root after `source scripts/env.sh && cargo build --release -p rabbit-cli`;
# the model: `rabbit synth --arch qwen2 --preset qwen2.5-1.5b --shards 4 --out /tmp/b15`.
# Time to first token from a fresh download (checkpoint just written: in the page cache; and
# cold on disk), split (made from scratch, its cost included) vs in place. 3 rounds.
source "$(dirname "$0")/common.sh"
ids=$(python3 -c "print(','.join(str(i*37%150000+1) for i in range(32)))")
for round in 1 2 3; do
  for state in hot cold; do
    for mode in split nosplit; do
      rm -rf $S; sync
      evict $M
      [ $state = hot ] && cat $M/*.safetensors > /dev/null
      extra=$(mode_args $mode)
      s=$(date +%s.%N)
      $R generate --model $M --device cpu --max-new-tokens 1 --input-ids $ids --resident-layers 0 $extra --json > /dev/null 2>&1
      e=$(date +%s.%N)
      echo "ttft $state $mode $round $(echo "$e - $s" | bc)" | tee -a $OUT/ttft.txt
    done
  done
done
rm -rf $S
echo done >> $OUT/ttft.txt
