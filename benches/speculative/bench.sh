#!/usr/bin/env bash
# Speculative decoding on a streamed model, every layer read from the disk each sweep (--cold):
# plain decoding, then drafts from perturbed copies of the target (`rabbit synth --like MODEL
# --noise SIGMA`) and prompt lookup. One JSON line per run in $OUT/spec.jsonl.
#   MODEL=/tmp/b15 DRAFTS="/tmp/b15 /tmp/l15-0.005" KS="4 7" [ADAPTIVE=1] benches/speculative/bench.sh
set -euo pipefail
R=${RABBIT:-$CARGO_TARGET_DIR/release/rabbit}
M=${MODEL:-/tmp/b15}
OUT=${OUT:-/tmp/rabbit-spec}
N=${NEW_TOKENS:-16}
mkdir -p $OUT
run() { # label, extra flags...
  local label=$1; shift
  $R bench --model $M --resident-layers 0 --cold --prompt-len 32 --new-tokens $N --repeat 1 \
    --no-baseline --json "$@" 2>/dev/null | tail -1 |
    python3 -c "import json,sys; r=json.load(sys.stdin); r['label']='$label'; print(json.dumps(r))" \
    >> $OUT/spec.jsonl
}
run plain
# ADAPTIVE=1 adds each run again with --adaptive-draft (K starts there and follows acceptance).
for d in ${DRAFTS:-}; do
  for k in ${KS:-4}; do
    run "draft $(basename $d) K=$k" --draft-model $d --draft-tokens $k
    [ -n "${ADAPTIVE:-}" ] && run "draft $(basename $d) K=$k adaptive" --draft-model $d --draft-tokens $k --adaptive-draft
  done
done
run "prompt lookup K=4" --prompt-lookup --draft-tokens 4
[ -n "${ADAPTIVE:-}" ] && run "prompt lookup K=4 adaptive" --prompt-lookup --draft-tokens 4 --adaptive-draft
python3 - $OUT/spec.jsonl <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
plain = next(r for r in rows if r['label'] == 'plain')
ps = plain['timings']['sweep_s'] / plain['timings']['sweeps']
print(f"{'run':34} {'s/token':>8} {'speed-up':>8} {'accept':>7} {'tok/sweep':>9} {'sweep s':>8} {'sweep/plain':>11} {'draft/sweep':>11}")
for r in rows:
    t = r['timings']
    sw = t['sweep_s'] / max(t['sweeps'], 1)
    acc = t['accepted_tokens'] / t['draft_tokens'] if t['draft_tokens'] else 0
    per = t['draft_s'] / max(t['sweeps'], 1)
    print(f"{r['label']:34} {r['decode_s_per_token']:8.3f} {plain['decode_s_per_token'] / r['decode_s_per_token']:8.2f} "
          f"{acc:7.2f} {t['tokens_per_sweep']:9.2f} {sw:8.3f} {sw / ps:11.2f} {per / sw:11.2f}")
PY
