#!/usr/bin/env python3
"""One AirLLM 4.0.0 run in its own process, for the rabbit side-by-side benchmark (issue #6).

Runs AirLLM the way its users do -- ``airllm.AutoModel.from_pretrained(path, device=...)`` with
its defaults (dtype from config.json, prefetching on, ``clean_memory()`` after every module) --
then one greedy ``generate()`` (which AirLLM delegates to transformers) on the given prompt ids,
and prints ONE JSON object as the last line of stdout. AirLLM prints its own progress on
stdout/stderr before that line.

Variants (``--variant``):

* ``airllm``: as shipped.
* ``airllm-no-gc``: ``airllm.airllm_base.clean_memory`` (gc.collect + malloc_trim +
  torch.cuda.empty_cache, run after every streamed module) replaced by a no-op at runtime. Not
  something AirLLM ships: it shows how much of AirLLM's time that call takes.
* ``transformers``: no AirLLM at all: ``transformers.AutoModelForCausalLM.from_pretrained``
  with the whole model in RAM (dtype from config.json), the same greedy ``generate()``: the
  compute floor a layer-streaming engine is measured against (``--compression none`` only).

Compression on the CPU: AirLLM 4.0.0's ``compress_layer_state_dict`` and
``uncompress_layer_state_dict`` (airllm/utils.py) hard-code ``.cuda()`` and
``device="cuda"``. With ``--device cpu`` and ``--compression 4bit|8bit`` those two functions are
rebuilt at runtime from their own installed source with only the device changed (``.cuda()`` ->
``.to("cpu")``, ``device="cuda"`` -> ``device="cpu"``), so they make the very same bitsandbytes
calls on the CPU. The installed package is never edited.

Modes (``--mode``):

* ``load``: time ``from_pretrained`` only (the harness deletes the split first to time AirLLM's
  split, which happens inside its first load).
* ``generate`` (default): load, then ``--repeat`` greedy generations of ``--new-tokens`` tokens.
* ``serve``: load, then generate on request (stdin), for the criterion bench; see ``serve``.

Decoding: greedy (``do_sample=False``, one beam, repetition penalty 1), exactly ``--new-tokens``
new tokens: the EOS ids are removed from the generation config so nothing stops early and no
logits are changed (rabbit's bench does the same: no EOS at all). ``min_new_tokens`` is not used
because it works by masking the EOS logits, which could change a greedy token. Per-token
timestamps come from a ``StoppingCriteria`` that transformers calls after every new token:
prefill (time to first token) is the first timestamp minus the start of ``generate()``; a decode
step is the gap between two consecutive timestamps.

Output fields (``ok`` true): ``load_s``, ``prefill_s``, ``decode_s_per_token`` (median step),
``decode_mean_s_per_token``, ``step_s`` (every step of the first repetition), ``generate_s`` (one
per repetition), ``output_ids`` (first repetition, one list per sequence), ``peak_rss_bytes``
(VmHWM of this process), ``peak_device_bytes`` (CUDA only), ``split_existed``, ``patches``,
``versions``. On failure: ``ok`` false, ``error`` (exception type and message), ``traceback`` (its
last lines), ``stage`` (import/load/generate), exit status 1.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import inspect
import json
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

VARIANTS = ("airllm", "airllm-no-gc", "transformers")

# How many occurrences of the CUDA-only calls each AirLLM 4.0.0 function has; a different count
# means a different AirLLM, and the patch refuses rather than guess.
_CUDA_CALLS = {
    "compress_layer_state_dict": {".cuda()": 2, 'device="cuda"': 0},
    "uncompress_layer_state_dict": {".cuda()": 4, 'device="cuda"': 1},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of one run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--model", required=True, help="HF checkpoint directory (e.g. from rabbit synth)"
    )
    p.add_argument(
        "--split-root",
        required=True,
        help="AirLLM's layer_shards_saving_path: it writes splitted_model[.4bit|.8bit]/ there",
    )
    p.add_argument("--compression", default="none", choices=["none", "4bit", "8bit"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--variant", default="airllm", choices=VARIANTS)
    p.add_argument("--mode", default="generate", choices=["load", "generate", "serve"])
    p.add_argument(
        "--prompt-ids-file", help="one sequence per line, ids separated by commas/spaces"
    )
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1, help="generations in this process")
    args = p.parse_args(argv)
    if args.mode != "load" and not args.prompt_ids_file:
        p.error(f"--mode {args.mode} needs --prompt-ids-file")
    if args.new_tokens < 1 or args.repeat < 1:
        p.error("--new-tokens and --repeat must be >= 1")
    return args


def read_prompt_ids(path: str) -> list[list[int]]:
    """Reads prompt ids in the format of ``rabbit bench --prompt-ids-file``.

    One sequence per non-empty line (lines starting with ``#`` are skipped), ids separated by
    commas and/or whitespace; or a JSON list of lists.
    """
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        seqs = [[int(t) for t in s] for s in json.loads(text)]
    else:
        seqs = [
            [int(t) for t in line.replace(",", " ").split()]
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
    if not seqs or any(not s for s in seqs):
        raise ValueError(f"{path}: needs at least one non-empty sequence")
    return seqs


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that matter for the comparison."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("airllm", "torch", "transformers", "accelerate", "bitsandbytes", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def patch_compression_device(utils_module, device: str) -> list[str]:
    """Rebuilds AirLLM's (un)compress functions with their CUDA calls moved to ``device``.

    The functions' installed source is read with ``inspect``, ``.cuda()`` becomes
    ``.to(<device>)`` and ``device="cuda"`` becomes ``device=<device>``, and the result is
    executed in ``airllm.utils``' own namespace, replacing the module globals that the splitter
    (``split_and_save_layers``) and the loader (``load_layer``) look up at call time. Returns a
    description of each patch.
    """
    done = []
    utils_module.__dict__["_RABBIT_BENCH_DEVICE"] = device
    for name, expected in _CUDA_CALLS.items():
        fn = getattr(utils_module, name)
        src = inspect.getsource(fn)
        for needle, count in expected.items():
            if src.count(needle) != count:
                raise RuntimeError(
                    f"airllm.utils.{name}: expected {count} x {needle!r} (AirLLM 4.0.0), "
                    f"found {src.count(needle)}; refusing to patch a different AirLLM"
                )
        new_src = src.replace(".cuda()", ".to(_RABBIT_BENCH_DEVICE)").replace(
            'device="cuda"', "device=_RABBIT_BENCH_DEVICE"
        )
        exec(compile(new_src, utils_module.__file__, "exec"), utils_module.__dict__)
        done.append(f"airllm.utils.{name}: .cuda() -> .to({device!r}) (runtime patch)")
    return done


def patch_no_gc(base_module) -> str:
    """Replaces the ``clean_memory`` that AirLLM's post-forward hook calls with a no-op."""

    def no_clean_memory() -> None:
        """Does nothing (airllm-no-gc variant)."""

    base_module.clean_memory = no_clean_memory
    return "airllm.airllm_base.clean_memory -> no-op (runtime patch)"


def split_dir(split_root: str, compression: str) -> Path:
    """Where AirLLM writes its split for this compression."""
    suffix = "" if compression == "none" else f".{compression}"
    return Path(split_root) / f"splitted_model{suffix}"


def make_clock():
    """A transformers StoppingCriteria that records a timestamp after every new token."""
    import torch
    from transformers import StoppingCriteria

    class StepClock(StoppingCriteria):
        """Records ``time.perf_counter()`` each time transformers asks whether to stop."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StepClock()


def greedy_config(model, new_tokens: int, pad_id: int | None):
    """The model's generation config made plain greedy, exactly ``new_tokens`` long, no EOS.

    The EOS ids are cleared on the model's own generation config too: transformers fills the
    fields of a passed config that equal the global defaults (``None`` for ``eos_token_id``) from
    the model's config, which would bring the EOS stop back.
    """
    cfg = copy.deepcopy(model.model.generation_config)
    model.model.generation_config.eos_token_id = None
    cfg.do_sample = False
    cfg.num_beams = 1
    cfg.max_new_tokens = new_tokens
    cfg.min_new_tokens = None
    cfg.max_length = None
    cfg.repetition_penalty = 1.0
    cfg.temperature = None
    cfg.top_k = None
    cfg.top_p = None
    cfg.eos_token_id = None
    if cfg.pad_token_id is None:
        cfg.pad_token_id = pad_id
    return cfg


def batch_tensors(prompts: list[list[int]], pad_id: int, device: str):
    """Left-padded input ids and attention mask (no padding when the prompts are equally long)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = [[pad_id] * (width - len(p)) + p for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return (
        torch.tensor(ids, dtype=torch.long, device=device),
        torch.tensor(mask, dtype=torch.long, device=device),
    )


def generate_once(model, input_ids, mask, gen_cfg, new_tokens: int) -> dict:
    """One timed greedy generation: prefill, decode step times, total and the new ids."""
    import torch
    from transformers import StoppingCriteriaList

    clock = make_clock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=mask,
            generation_config=gen_cfg,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    end = time.perf_counter()
    sequences = out.sequences if hasattr(out, "sequences") else out
    stamps = clock.stamps
    if len(stamps) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} token steps, timed {len(stamps)}")
    return {
        "prefill_s": stamps[0] - start,
        "steps": [b - a for a, b in zip(stamps, stamps[1:])],
        "generate_s": end - start,
        "output_ids": sequences[:, input_ids.shape[1] :].tolist(),
    }


def serve(once, result: dict) -> None:
    """``--mode serve``: the loaded model answers requests on stdin, one JSON line each.

    Prints ``{"ok": true, "ready": true, "load_s": ...}`` once loaded; then each stdin line ``N``
    runs N generations and prints ``{"ok": true, "generate_s": [...]}``; EOF ends the process.
    Used by the criterion bench (benches/airllm.rs) so that Python start-up, imports and the load
    are paid once, not per sample.
    """
    ready = {k: v for k, v in result.items() if k != "stage"}
    print(json.dumps({**ready, "ok": True, "ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        runs = [once() for _ in range(int(line))]
        reply = {"ok": True, "generate_s": [r["generate_s"] for r in runs]}
        reply["output_ids"] = runs[0]["output_ids"] if runs else None
        print(json.dumps(reply), flush=True)


def run(args: argparse.Namespace, result: dict) -> None:
    """Loads AirLLM and generates, filling ``result``; exceptions propagate to ``main``."""
    result["stage"] = "import"
    import torch

    result["versions"] = versions()
    result["torch_threads"] = torch.get_num_threads()
    on_cuda = args.device.startswith("cuda")
    device = "cuda:0" if args.device == "cuda" else args.device
    if args.variant == "transformers":
        from transformers import AutoModelForCausalLM

        if args.compression != "none":
            raise ValueError("the transformers variant runs uncompressed checkpoints only")
        result["patches"] = []
        result["stage"] = "load"
        start = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").to(device).eval()
        result["load_s"] = time.perf_counter() - start
        result["dtype"] = str(hf.dtype).replace("torch.", "")

        class Whole:
            """AirLLM's ``.model`` / ``.generate`` shape over a plain transformers model."""

            model = hf
            generate = hf.generate

        model = Whole()
    else:
        import airllm
        import airllm.airllm_base as airllm_base
        import airllm.utils as airllm_utils

        patches = []
        if args.compression != "none" and not on_cuda:
            patches += patch_compression_device(airllm_utils, "cpu")
        if args.variant == "airllm-no-gc":
            patches.append(patch_no_gc(airllm_base))
        result["patches"] = patches

        result["stage"] = "load"
        sdir = split_dir(args.split_root, args.compression)
        result["split_dir"] = str(sdir)
        result["split_existed"] = sdir.is_dir() and any(sdir.glob("*.done"))
        kwargs = {"device": device, "layer_shards_saving_path": args.split_root}
        if args.compression != "none":
            kwargs["compression"] = args.compression
        start = time.perf_counter()
        model = airllm.AutoModel.from_pretrained(args.model, **kwargs)
        result["load_s"] = time.perf_counter() - start
        result["dtype"] = str(model.running_dtype).replace("torch.", "")
    if args.mode == "load":
        result["peak_rss_bytes"] = peak_rss_bytes()
        return

    result["stage"] = "generate"
    prompts = read_prompt_ids(args.prompt_ids_file)
    pad_id = model.model.generation_config.pad_token_id
    if pad_id is None:
        pad_id = 0
    input_ids, mask = batch_tensors(prompts, pad_id, device)
    gen_cfg = greedy_config(model, args.new_tokens, pad_id)

    def once() -> dict:
        return generate_once(model, input_ids, mask, gen_cfg, args.new_tokens)

    if args.mode == "serve":
        serve(once, result)
        return
    reps = [once() for _ in range(args.repeat)]
    first = reps[0]
    result["output_ids"] = first["output_ids"]
    result["deterministic"] = all(r["output_ids"] == first["output_ids"] for r in reps)
    result["step_s"] = first["steps"]
    result["generate_s"] = [r["generate_s"] for r in reps]
    result["prefill_s"] = statistics.median(r["prefill_s"] for r in reps)
    all_steps = [s for r in reps for s in r["steps"]]
    result["decode_s_per_token"] = statistics.median(all_steps) if all_steps else None
    result["decode_mean_s_per_token"] = statistics.fmean(all_steps) if all_steps else None
    result["peak_rss_bytes"] = peak_rss_bytes()
    if on_cuda:
        result["peak_device_bytes"] = torch.cuda.max_memory_allocated()


def main(argv: list[str] | None = None) -> int:
    """Runs once and prints the JSON result as the last stdout line; 1 on failure."""
    args = parse_args(argv)
    result: dict = {
        "engine": args.variant,
        "mode": args.mode,
        "compression": args.compression,
        "device": args.device,
        "new_tokens": args.new_tokens,
        "ok": False,
    }
    status = 0
    try:
        run(args, result)
        result["ok"] = True
        result.pop("stage", None)
    except BaseException as e:  # noqa: BLE001 - every failure is reported, not raised
        if isinstance(e, KeyboardInterrupt):
            raise
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        result["traceback"] = traceback.format_exc().splitlines()[-12:]
        status = 1
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
