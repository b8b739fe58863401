"""A draft model that agrees with its target in a known way, for speculative-decoding benchmarks.

Random weights make any two independently made models disagree, so acceptance rates measured
with them mean nothing. This writes a draft *derived from* the target: its first LAYERS decoder
layers, its embedding, final norm and LM head, every tensor perturbed by Gaussian noise of
NOISE times that tensor's own standard deviation. NOISE = 0 with all layers is the target itself
(acceptance 1); fewer layers and more noise lower the acceptance. Real target/draft pairs (e.g.
Qwen2.5-0.5B drafting for Qwen2.5-7B) are what matters; their acceptance is reported in the
literature (docs/BENCHMARKS.md).

usage: python make_draft.py TARGET_DIR OUT_DIR --layers N --noise SIGMA [--seed S]
(needs torch and safetensors: the project's venv has both)
"""

import argparse
import json
import os
import re
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--noise", type=float, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if os.path.exists(a.out):
        sys.exit(f"{a.out}: already exists; give a new directory")
    cfg = json.load(open(os.path.join(a.target, "config.json")))
    n = cfg["num_hidden_layers"]
    if not 1 <= a.layers <= n:
        sys.exit(f"--layers {a.layers}: the target has {n} layers")
    if a.noise < 0:
        sys.exit("--noise must be >= 0")
    files = sorted(f for f in os.listdir(a.target) if f.endswith(".safetensors"))
    if not files:
        sys.exit(f"{a.target}: no .safetensors weights")
    gen = torch.Generator().manual_seed(a.seed)
    out = {}
    for f in files:
        for name, t in load_file(os.path.join(a.target, f)).items():
            m = re.search(r"\.layers\.(\d+)\.", name)
            if m and int(m.group(1)) >= a.layers:
                continue
            if a.noise > 0 and t.is_floating_point() and t.numel() > 1:
                w = t.float()
                w = w + torch.randn(w.shape, generator=gen) * (w.std() * a.noise)
                t = w.to(t.dtype)
            out[name] = t.contiguous()
    os.makedirs(a.out)
    save_file(out, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    cfg["num_hidden_layers"] = a.layers
    for key in ("layer_types", "max_window_layers"):
        if isinstance(cfg.get(key), list):
            cfg[key] = cfg[key][: a.layers]
    json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=2)
    for f in os.listdir(a.target):
        if f.startswith("tokenizer") or f in ("vocab.json", "merges.txt", "generation_config.json"):
            shutil.copy(os.path.join(a.target, f), a.out)
    print(f"{a.out}: {a.layers}/{n} layers, noise {a.noise}")


if __name__ == "__main__":
    main()
