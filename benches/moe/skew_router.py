#!/usr/bin/env python3
"""Makes a synthetic mixture of experts route non-uniformly (for the expert-cache benchmark).

Random weights route nearly uniformly: every expert is as likely as any other, which no real
model does and which leaves a cache nothing to learn. This gives the residual stream a constant
component along hidden dimension 0 (every embedding row's element 0 set to ``--offset``) and
each router a matching column: router row ``e`` gets ``--skew * (1 - 2 e / (E - 1))`` in
column 0, a ramp from ``+skew`` (expert 0) to ``-skew`` (the last). Low-numbered experts are then
chosen more often, and which ones still depends on the token. Everything else is untouched.

    python benches/moe/skew_router.py DIR [--offset 0.035] [--skew 0.6]

Rewrites DIR's weight files in place (tmp + rename): use it on a `rabbit synth` output.
Needs torch and safetensors (the torch venv of scripts/env.sh).
"""

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--offset", type=float, default=0.035)
    ap.add_argument("--skew", type=float, default=0.6)
    a = ap.parse_args()
    files = sorted(a.dir.glob("*.safetensors"))
    routers = 0
    for f in files:
        with safe_open(f, "pt") as st:
            meta = st.metadata()
            tensors = {k: st.get_tensor(k) for k in st.keys()}
        changed = False
        for k, t in tensors.items():
            if k.endswith("embed_tokens.weight"):
                t[:, 0] = a.offset
                changed = True
            elif k.endswith("mlp.gate.weight") or k.endswith("block_sparse_moe.gate.weight"):
                e = t.shape[0]
                ramp = 1.0 - 2.0 * torch.arange(e, dtype=torch.float32) / max(e - 1, 1)
                t[:, 0] = (a.skew * ramp).to(t.dtype)
                routers += 1
                changed = True
        if changed:
            tmp = f.with_suffix(".tmp")
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, f)
    print(json.dumps({"files": len(files), "routers": routers, "offset": a.offset, "skew": a.skew}))


if __name__ == "__main__":
    main()
