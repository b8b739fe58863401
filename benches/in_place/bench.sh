#!/bin/bash
# Run from the repository root after `source scripts/env.sh && cargo build --release -p rabbit-cli`;
# the model: `rabbit synth --arch qwen2 --preset qwen2.5-1.5b --shards 4 --out /tmp/b15`.
# Decode, split vs --no-split on the qwen2.5-1.5b shape (bf16, 4 shards), CPU, 2 threads: from the
# page cache, then from the disk (--cold, --direct-io). Time to first token: ttft.sh.
source "$(dirname "$0")/common.sh"
[ -f $S/manifest.json ] || $R split --model $M --out $S > /dev/null
# Decode: page cache, interleaved, 3 rounds.
cat $M/*.safetensors $S/*.safetensors > /dev/null
for round in 1 2 3; do
  for mode in split nosplit; do
    extra=$(mode_args $mode)
    $R bench --model $M --device cpu --resident-layers 0 --new-tokens 8 --repeat 3 --no-baseline --json $extra > $OUT/warm-$mode-$round.json 2>/dev/null
    python3 -c "import json,sys; v=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print('warm', sys.argv[2], sys.argv[3], v['decode_s_per_token'], v['bytes_streamed_per_token'], v['read_bytes_per_s'])" $OUT/warm-$mode-$round.json $mode $round | tee -a $OUT/summary.txt
  done
done
# Decode from disk: --cold (pages dropped after use) and --direct-io, 2 rounds.
for round in 1 2; do
  for flag in --cold --direct-io; do
    for mode in split nosplit; do
      extra=$(mode_args $mode)
      evict $M; evict $S
      $R bench --model $M --device cpu --resident-layers 0 --new-tokens 8 --repeat 3 --no-baseline --json $flag $extra > $OUT/cold$flag-$mode-$round.json 2>/dev/null
      python3 -c "import json,sys; v=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print('disk', sys.argv[4], sys.argv[2], sys.argv[3], v['decode_s_per_token'], v['bytes_streamed_per_token'], v['read_bytes_per_s'])" $OUT/cold$flag-$mode-$round.json $mode $round $flag | tee -a $OUT/summary.txt
    done
  done
done
echo done | tee -a $OUT/summary.txt
