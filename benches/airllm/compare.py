#!/usr/bin/env python3
"""rabbit vs AirLLM 4.0.0, side by side on the same synthetic checkpoint (issue #6).

Drives the whole comparison with the standard library only (run it with the system python3 or
the AirLLM venv's python; ``benches/airllm/run.sh`` does the setup and calls it):

1. ``rabbit synth`` writes a real HF checkpoint per preset (bf16, seeded random weights, a real
   tokenizer) under ``<work>/models/``; transformers and AirLLM load it as they would a hub model.
2. For each (preset, compression): the split of each engine is timed from scratch -- the split
   directory is deleted, then one fresh process loads the model (rabbit: ``rabbit generate`` with
   one new token, its ``load_s``; AirLLM: ``run_airllm.py --mode load``, the time of
   ``AutoModel.from_pretrained``, which is where AirLLM splits).
3. For each batch size, ``--reps`` repetitions of every engine variant, alternating (rabbit,
   airllm, airllm-no-gc, rabbit, ...), each in a fresh process, on the same prompt ids (written
   once per batch size to a file both engines read), same number of new tokens, greedy, no EOS.
4. One extra rabbit run with its compute-only baseline gives the floor columns: I/O floor (bytes
   streamed per token / measured read bandwidth of the same files) and the decode step of a fully
   resident run (compute only).
5. Medians over the repetitions go to ``results.json`` (every raw run too) and ``results.md``
   (the table), rewritten after every run so an interrupted matrix keeps what it measured.

Peak RSS is the ``ru_maxrss`` of the engine's own process (``os.wait4``). Any engine failure
(an exception, a crash, a timeout) is recorded with its message and shown in the table; the
matrix goes on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ENGINES = ("rabbit", "rabbit-resident", "transformers", "airllm", "airllm-no-gc")
ENGINE_LABELS = {
    "rabbit": "rabbit",
    "rabbit-resident": "rabbit, every layer resident",
    "transformers": "transformers (whole model in RAM)",
    "airllm": "AirLLM 4.0.0 (as shipped)",
    "airllm-no-gc": "airllm-no-gc (patched)",
}
# Engines run by run_airllm.py in the AirLLM venv (transformers: no AirLLM, no split).
PYTHON_ENGINES = ("transformers", "airllm", "airllm-no-gc")


def family(engine: str) -> str | None:
    """Whose split an engine reads: ``rabbit``, ``airllm``, or None (transformers: none)."""
    if engine.startswith("rabbit"):
        return "rabbit"
    return None if engine == "transformers" else "airllm"


def resident_args(rabbit_args: str) -> list[str]:
    """``--rabbit-args`` with its ``--resident-layers`` replaced by every layer resident."""
    out, skip = [], False
    for tok in shlex.split(rabbit_args):
        if skip:
            skip = False
        elif tok == "--resident-layers":
            skip = True
        elif not tok.startswith("--resident-layers="):
            out.append(tok)
    return out + ["--resident-layers", "1000000"]
COMPRESSIONS = ("none", "4bit", "8bit")


def log(msg: str) -> None:
    """Progress line on stderr."""
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def csv_list(text: str) -> list[str]:
    """``"a,b, c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the driver; every matrix axis is selectable."""
    cache = Path(os.environ.get("RABBIT_CACHE") or Path.home() / ".cache" / "rabbitllm")
    p = argparse.ArgumentParser(
        description="rabbit vs AirLLM side-by-side benchmark (issue #6)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--presets", default="qwen2.5-0.5b,qwen2.5-1.5b", help="rabbit synth presets")
    p.add_argument("--arch", default="qwen2", help="rabbit synth --arch")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--compressions", default="none,4bit,8bit", help="subset of none,4bit,8bit")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"subset of {','.join(ENGINES)}")
    p.add_argument("--reps", type=int, default=3, help="repetitions per engine (medians)")
    p.add_argument("--split-reps", type=int, default=1, help="timed from-scratch splits per engine")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=8, help="new tokens per sequence (>= 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt ids")
    p.add_argument("--model-seed", type=int, default=1, help="rabbit synth --seed")
    p.add_argument("--layers", type=int, help="override the presets' layer count (smoke tests)")
    p.add_argument("--vocab", type=int, help="override the presets' vocabulary (smoke tests)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both engines)")
    p.add_argument(
        "--rabbit-args",
        default="--resident-layers 0",
        help="extra arguments of every rabbit run (default: stream every layer, as AirLLM does)",
    )
    p.add_argument(
        "--busy",
        type=int,
        default=0,
        help="other processes spinning on a core each during every timed run (a busy machine)",
    )
    p.add_argument("--no-floor", action="store_true", help="skip rabbit's floor run per cell")
    p.add_argument("--keep-splits", action="store_true", help="keep split dirs after each cell")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per engine process")
    p.add_argument("--work", type=Path, default=cache / "airllm-bench", help="models, splits")
    p.add_argument("--out", type=Path, help="results dir (default <work>/results/<timestamp>)")
    p.add_argument(
        "--rabbit",
        type=Path,
        default=Path(os.environ.get("CARGO_TARGET_DIR") or cache / "target") / "release/rabbit",
        help="rabbit binary",
    )
    p.add_argument(
        "--python",
        type=Path,
        default=cache / "venv-airllm-4.0.0/bin/python",
        help="python of the AirLLM venv (benches/airllm/setup_venv.sh)",
    )
    a = p.parse_args(argv)
    a.presets = csv_list(a.presets)
    a.batches = [int(b) for b in csv_list(a.batches)]
    a.compressions = csv_list(a.compressions)
    a.engines = csv_list(a.engines)
    bad = [c for c in a.compressions if c not in COMPRESSIONS]
    bad += [e for e in a.engines if e not in ENGINES]
    if bad:
        p.error(f"unknown compression/engine: {', '.join(bad)}")
    if a.busy < 0:
        p.error("--busy must be >= 0")
    if a.new_tokens < 2 or a.reps < 1 or a.split_reps < 0 or a.prompt_len < 1:
        p.error("needs --new-tokens >= 2, --reps >= 1, --split-reps >= 0, --prompt-len >= 1")
    if any(b < 1 for b in a.batches):
        p.error("batch sizes must be >= 1")
    if a.out is None:
        a.out = a.work / "results" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return a


# ---- processes ---------------------------------------------------------------------------------


def run_process(cmd: list[str], log_path: Path, timeout: float, env: dict | None = None) -> dict:
    """Runs ``cmd`` in a fresh process (its own session) and measures it.

    Returns ``rc`` (exit status; negative = killed by that signal), ``wall_s``, ``maxrss_bytes``
    (the process's ``ru_maxrss`` via ``os.wait4``), ``timed_out``, ``json`` (the last stdout line
    that parses as a JSON object, or None) and ``tail`` (the last lines of stderr+stdout). Output
    goes to ``log_path``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
        rc = os.waitstatus_to_exitcode(status)
        proc.returncode = rc  # reaped here; keeps Popen from waiting again
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    header = f"$ {shlex.join(cmd)}\n# rc={rc} wall={wall:.3f}s\n"
    log_path.write_text(f"{header}--- stdout\n{stdout}\n--- stderr\n{stderr}")
    parsed = None
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                parsed = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    tail = (stderr.strip().splitlines() + stdout.strip().splitlines())[-8:]
    return {
        "cmd": cmd,
        "rc": rc,
        "wall_s": wall,
        "maxrss_bytes": usage.ru_maxrss * 1024,
        "timed_out": timed_out.is_set(),
        "json": parsed,
        "tail": tail,
        "log": str(log_path),
    }


class Busy:
    """``n`` processes spinning on a core each while a timed run goes on (``--busy``)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Busy":
        for _ in range(self.n):
            self.procs.append(
                subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            )
        if self.n:
            time.sleep(0.5)  # running before the engine starts
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def loadavg() -> float | None:
    """The 1-minute load average (how busy the machine was around a run)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def failure_text(proc: dict) -> str:
    """Why a process gave no usable result, in one line."""
    j = proc.get("json") or {}
    if j.get("error"):
        return str(j["error"])
    if proc["timed_out"]:
        return f"timed out (killed after {proc['wall_s']:.0f} s)"
    if proc["rc"] < 0:
        return f"killed by signal {-proc['rc']} ({signal.Signals(-proc['rc']).name})"
    for line in reversed(proc["tail"]):
        if "error" in line.lower():
            line = line.strip()
            return (line[len("error: ") :] if line.startswith("error: ") else line)[:500]
    return f"exit status {proc['rc']}: " + " | ".join(proc["tail"][-2:])[:500]


# ---- inputs ------------------------------------------------------------------------------------


def model_name(args: argparse.Namespace, preset: str) -> str:
    """Directory name of a synthesized checkpoint (overrides and seed included)."""
    name = f"{args.arch}-{preset}"
    if args.layers:
        name += f"-l{args.layers}"
    if args.vocab:
        name += f"-v{args.vocab}"
    return f"{name}-s{args.model_seed}"


def synth_model(args: argparse.Namespace, preset: str) -> Path:
    """Writes (or reuses) the bf16 checkpoint of ``preset`` with ``rabbit synth``."""
    out = args.work / "models" / model_name(args, preset)
    cmd = [str(args.rabbit), "synth", "--arch", args.arch, "--preset", preset, "--dtype", "bf16"]
    cmd += ["--seed", str(args.model_seed), "--out", str(out)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    if args.vocab:
        cmd += ["--vocab", str(args.vocab)]
    log(f"synth: {shlex.join(cmd)}")
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    return out


def prompt_id_limit(model_dir: Path) -> int:
    """The bound prompt ids are drawn below.

    It is the tokenizer's ordinary vocabulary (no special tokens) within the model's vocab_size,
    so both engines get valid, non-special ids.
    """
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    vocab_json = model_dir / "vocab.json"
    if vocab_json.exists():
        return max(1, min(vocab_size, len(json.loads(vocab_json.read_text()))))
    return vocab_size


def write_prompts(path: Path, seed: int, batch: int, length: int, limit: int) -> list[list[int]]:
    """Seeded prompt ids (``batch`` equal-length sequences) in ``--prompt-ids-file`` format."""
    rng = random.Random(f"{seed}-{batch}-{length}-{limit}")
    prompts = [[rng.randrange(limit) for _ in range(length)] for _ in range(batch)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(",".join(map(str, p)) + "\n" for p in prompts))
    return prompts


# ---- one engine run ----------------------------------------------------------------------------


def run_key(engine: str, preset: str, batch: int, compression: str, rep: int) -> dict:
    """The fields that identify one timed run in results.json."""
    return {
        "kind": "run",
        "engine": engine,
        "preset": preset,
        "batch": batch,
        "compression": compression,
        "rep": rep,
    }


class Bench:
    """The matrix: runs every engine process and keeps the records and the results files."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runs: list[dict] = []
        self.meta = self.describe()
        args.out.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        # Everything is local; keep transformers off the network and quiet about tokenizers.
        self.env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    # -- bookkeeping --

    def describe(self) -> dict:
        """Machine, versions and workload, for the report."""
        a = self.args
        info: dict = {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]),
            "workload": {
                "prompt_len": a.prompt_len,
                "new_tokens": a.new_tokens,
                "reps": a.reps,
                "split_reps": a.split_reps,
                "seed": a.seed,
                "model_seed": a.model_seed,
                "device": a.device,
                "rabbit_args": a.rabbit_args,
                "busy": a.busy,
                "decoding": "greedy, no EOS stop, same prompt ids for both engines",
            },
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
        }
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    info["machine"]["cpu"] = line.split(":", 1)[1].strip()
                    break
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal"):
                    info["machine"]["memory_bytes"] = int(line.split()[1]) * 1024
        except OSError:
            pass
        for key, cmd in {
            "rabbit_version": [str(a.rabbit), "--version"],
            "git_commit": ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        }.items():
            try:
                info[key] = subprocess.run(
                    cmd, capture_output=True, text=True, check=True
                ).stdout.strip()
            except (OSError, subprocess.CalledProcessError):
                info[key] = None
        return info

    def save(self) -> None:
        """Rewrites results.json and results.md from what was measured so far."""
        rows = summarize(self.runs, self.args)
        data = {"meta": self.meta, "rows": rows, "runs": self.runs}
        tmp = self.args.out / "results.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.args.out / "results.json")
        (self.args.out / "results.md").write_text(render_markdown(rows, self.meta, self.runs))

    def record(self, rec: dict) -> dict:
        """Keeps one run's record and saves the results files."""
        self.runs.append(rec)
        if rec.get("ok"):
            shown = {
                k: rec.get(k) for k in ("split_s", "load_s", "prefill_s", "decode_s_per_token")
            }
            shown = ", ".join(f"{k}={v:.4g}" for k, v in shown.items() if v is not None)
            if rec.get("peak_rss_bytes"):
                shown += f", peak RSS {rec['peak_rss_bytes'] / 2**30:.2f} GiB"
            log(f"  {rec['kind']} {rec['engine']}: ok, {shown}")
        else:
            log(f"  {rec['kind']} {rec['engine']}: FAILED: {rec.get('error')}")
        self.save()
        return rec

    # -- paths --

    def rabbit_split_dir(self, model: Path, compression: str) -> Path:
        """The split directory of rabbit for this model and compression."""
        return self.args.work / "splits" / model.name / f"rabbit-{compression}"

    def airllm_split_root(self, model: Path) -> Path:
        """AirLLM's layer_shards_saving_path for this model."""
        return self.args.work / "splits" / model.name / "airllm"

    def airllm_split_dir(self, model: Path, compression: str) -> Path:
        """The splitted_model[.4bit|.8bit] directory AirLLM writes under its split root."""
        suffix = "" if compression == "none" else f".{compression}"
        return self.airllm_split_root(model) / f"splitted_model{suffix}"

    def log_path(self, name: str) -> Path:
        """Log file of the next run."""
        return self.args.out / "logs" / f"{len(self.runs):04d}-{name}.log"

    # -- commands --

    def rabbit_common(self, model: Path, compression: str, resident: bool = False) -> list[str]:
        """Arguments shared by every rabbit command of a cell (``resident``: every layer kept
        resident instead of ``--rabbit-args``' ``--resident-layers``)."""
        cmd = ["--model", str(model), "--split-dir", str(self.rabbit_split_dir(model, compression))]
        extra = resident_args(self.args.rabbit_args) if resident else shlex.split(self.args.rabbit_args)
        cmd += ["--device", self.args.device, *extra]
        if compression != "none":
            cmd += ["--compression", compression]
        return cmd

    def airllm_cmd(
        self, model: Path, compression: str, variant: str, mode: str, prompts: Path | None
    ) -> list[str]:
        """Command line of one run_airllm.py process."""
        cmd = [str(self.args.python), str(HERE / "run_airllm.py"), "--model", str(model)]
        cmd += ["--split-root", str(self.airllm_split_root(model)), "--compression", compression]
        cmd += ["--device", self.args.device, "--variant", variant, "--mode", mode]
        if prompts is not None:
            cmd += ["--prompt-ids-file", str(prompts), "--new-tokens", str(self.args.new_tokens)]
        return cmd

    # -- runs --

    def split_run(
        self, family: str, model: Path, preset: str, compression: str, prompt: list[int], rep: int
    ) -> dict:
        """Deletes ``family``'s split, then times one fresh process's first load (the split)."""
        base = {
            "kind": "split",
            "engine": family,
            "preset": preset,
            "compression": compression,
            "rep": rep,
        }
        if family == "rabbit":
            shutil.rmtree(self.rabbit_split_dir(model, compression), ignore_errors=True)
            cmd = [str(self.args.rabbit), "generate", *self.rabbit_common(model, compression)]
            cmd += ["--input-ids", ",".join(map(str, prompt)), "--max-new-tokens", "1", "--json"]
        else:
            shutil.rmtree(self.airllm_split_dir(model, compression), ignore_errors=True)
            cmd = self.airllm_cmd(model, compression, "airllm", "load", None)
        proc = run_process(
            cmd,
            self.log_path(f"split-{family}-{preset}-{compression}"),
            self.args.timeout,
            self.env,
        )
        j = proc["json"] or {}
        split_s = (j.get("timings") or {}).get("load_s") if family == "rabbit" else j.get("load_s")
        ok = proc["rc"] == 0 and split_s is not None
        rec = {**base, "ok": ok, "split_s": split_s, "wall_s": proc["wall_s"], "log": proc["log"]}
        if not ok:
            rec["error"] = failure_text(proc)
        return self.record(rec)

    def engine_run(
        self,
        engine: str,
        model: Path,
        preset: str,
        batch: int,
        compression: str,
        prompts: Path,
        rep: int,
    ) -> dict:
        """One timed run of ``engine`` in a fresh process."""
        a = self.args
        base = run_key(engine, preset, batch, compression, rep)
        if family(engine) == "rabbit":
            cmd = [str(a.rabbit), "bench", *self.rabbit_common(model, compression)]
            if engine == "rabbit-resident":
                cmd = [str(a.rabbit), "bench", *self.rabbit_common(model, compression, True)]
            cmd += ["--prompt-ids-file", str(prompts), "--new-tokens", str(a.new_tokens)]
            cmd += ["--repeat", "1", "--no-baseline", "--json"]
        else:
            cmd = self.airllm_cmd(model, compression, engine, "generate", prompts)
        load_before = loadavg()
        with Busy(a.busy):
            proc = run_process(
                cmd,
                self.log_path(f"{engine}-{preset}-b{batch}-{compression}-r{rep}"),
                a.timeout,
                self.env,
            )
        j = proc["json"] or {}
        rec = {
            **base,
            "wall_s": proc["wall_s"],
            "peak_rss_bytes": proc["maxrss_bytes"],
            "log": proc["log"],
            "loadavg_before": load_before,
            "busy": a.busy,
        }
        if family(engine) == "rabbit":
            ok = proc["rc"] == 0 and "decode_s_per_token" in j
            if ok:
                rec.update(
                    load_s=j.get("load_s"),
                    prefill_s=j.get("prefill_s"),
                    decode_s_per_token=j["decode_s_per_token"],
                    output_ids=j.get("output_ids"),
                    engine_peak_rss_bytes=j.get("peak_memory_bytes"),
                    bytes_streamed_per_token=j.get("bytes_streamed_per_token"),
                    read_bytes_per_s=j.get("read_bytes_per_s"),
                    io_floor_s_per_token=j.get("io_floor_s_per_token"),
                    mean_threads=j.get("mean_threads"),
                    peak_anon_bytes=j.get("peak_anon_bytes"),
                )
        else:
            ok = proc["rc"] == 0 and bool(j.get("ok"))
            if ok:
                rec.update(
                    load_s=j.get("load_s"),
                    prefill_s=j.get("prefill_s"),
                    decode_s_per_token=j.get("decode_s_per_token"),
                    decode_mean_s_per_token=j.get("decode_mean_s_per_token"),
                    step_s=j.get("step_s"),
                    output_ids=j.get("output_ids"),
                    engine_peak_rss_bytes=j.get("peak_rss_bytes"),
                    peak_device_bytes=j.get("peak_device_bytes"),
                    patches=j.get("patches"),
                    versions=j.get("versions"),
                    split_existed=j.get("split_existed"),
                )
        rec["ok"] = ok
        if not ok:
            rec["error"] = failure_text(proc)
        return self.record(rec)

    def floor_run(
        self, model: Path, preset: str, batch: int, compression: str, prompts: Path
    ) -> dict:
        """One `rabbit bench` with its compute-only baseline, for the floor columns.

        Not part of the medians.

        In-process repetitions (at least 2) so the fully resident compute figure is a median too.
        """
        a = self.args
        base = {
            "kind": "floor",
            "engine": "rabbit",
            "preset": preset,
            "batch": batch,
            "compression": compression,
        }
        cmd = [str(a.rabbit), "bench", *self.rabbit_common(model, compression)]
        cmd += ["--prompt-ids-file", str(prompts), "--new-tokens", str(a.new_tokens)]
        cmd += ["--repeat", str(max(2, a.reps)), "--json"]
        with Busy(a.busy):
            proc = run_process(
                cmd, self.log_path(f"floor-{preset}-b{batch}-{compression}"), a.timeout, self.env
            )
        j = proc["json"] or {}
        ok = proc["rc"] == 0 and "io_floor_s_per_token" in j
        rec = {**base, "ok": ok, "wall_s": proc["wall_s"], "log": proc["log"]}
        if ok:
            rec.update(
                {
                    k: j.get(k)
                    for k in (
                        "io_floor_s_per_token",
                        "compute_s_per_token",
                        "floor_s_per_token",
                        "bytes_streamed_per_token",
                        "read_bytes_per_s",
                        "decode_s_per_token",
                    )
                }
            )
        else:
            rec["error"] = failure_text(proc)
        return self.record(rec)

    # -- the matrix --

    def run(self) -> None:
        """Runs the selected matrix."""
        a = self.args
        rabbit_on = "rabbit" in a.engines
        families_on = {family(e) for e in a.engines} - {None}
        for preset in a.presets:
            model = synth_model(a, preset)
            limit = prompt_id_limit(model)
            prompt_files = {}
            for batch in a.batches:
                path = a.out / "prompts" / f"{model.name}-b{batch}.txt"
                prompts = write_prompts(path, a.seed, batch, a.prompt_len, limit)
                prompt_files[batch] = (path, prompts)
            first_prompt = prompt_files[a.batches[0]][1][0]
            for compression in a.compressions:
                log(f"== {preset} / {compression}")
                families = [f for f in ("rabbit", "airllm") if f in families_on]
                split_failed: dict[str, str] = {}
                for rep in range(a.split_reps):
                    for fam in families:
                        rec = self.split_run(fam, model, preset, compression, first_prompt, rep)
                        if not rec["ok"]:
                            split_failed[fam] = rec["error"]
                for batch in a.batches:
                    prompts, _ = prompt_files[batch]
                    for rep in range(a.reps):
                        for engine in a.engines:
                            fam = family(engine)
                            if engine == "transformers" and compression != "none":
                                continue  # transformers runs the uncompressed checkpoint only
                            if fam in split_failed:
                                base = run_key(engine, preset, batch, compression, rep)
                                self.record(
                                    {
                                        **base,
                                        "ok": False,
                                        "error": f"split failed: {split_failed[fam]}",
                                    }
                                )
                                continue
                            self.engine_run(engine, model, preset, batch, compression, prompts, rep)
                    if rabbit_on and not a.no_floor and "rabbit" not in split_failed:
                        self.floor_run(model, preset, batch, compression, prompts)
                if not a.keep_splits:
                    shutil.rmtree(self.rabbit_split_dir(model, compression), ignore_errors=True)
                    shutil.rmtree(self.airllm_split_dir(model, compression), ignore_errors=True)


# ---- summary -----------------------------------------------------------------------------------


def median(values: list) -> float | None:
    """Median of the non-None values, or None."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def agreement(reference: list[list[int]] | None, other: list[list[int]] | None) -> dict | None:
    """How many leading greedy tokens agree, per sequence, and the minimum over sequences."""
    if not reference or not other or len(reference) != len(other):
        return None
    per_seq = []
    for r, o in zip(reference, other):
        k = 0
        while k < min(len(r), len(o)) and r[k] == o[k]:
            k += 1
        per_seq.append(k)
    return {"min": min(per_seq), "of": len(reference[0]), "per_sequence": per_seq}


def summarize(runs: list[dict], args: argparse.Namespace) -> list[dict]:
    """One row per (preset, batch, compression, engine): medians, agreement, ratio, floors."""
    rows = []
    for preset in args.presets:
        for batch in args.batches:
            for compression in args.compressions:
                cell = [
                    r
                    for r in runs
                    if r.get("preset") == preset and r.get("compression") == compression
                ]
                if not cell:
                    continue
                timed = [r for r in cell if r["kind"] == "run" and r.get("batch") == batch]
                rabbit_ok = [r for r in timed if r["engine"] == "rabbit" and r["ok"]]
                rabbit_ref = rabbit_ok[0].get("output_ids") if rabbit_ok else None
                rabbit_decode = median([r.get("decode_s_per_token") for r in rabbit_ok])
                floor = next(
                    (
                        r
                        for r in cell
                        if r["kind"] == "floor" and r.get("batch") == batch and r["ok"]
                    ),
                    None,
                )
                for engine in args.engines:
                    fam = family(engine)
                    mine = [r for r in timed if r["engine"] == engine]
                    if not mine:
                        continue
                    ok = [r for r in mine if r["ok"]]
                    splits = [r for r in cell if r["kind"] == "split" and r["engine"] == fam]
                    row = {
                        "preset": preset,
                        "batch": batch,
                        "compression": compression,
                        "engine": engine,
                        "runs_ok": len(ok),
                        "runs": len(mine),
                        "split_s": median([r.get("split_s") for r in splits if r["ok"]]),
                        "load_s": median([r.get("load_s") for r in ok]),
                        "prefill_s": median([r.get("prefill_s") for r in ok]),
                        "decode_s_per_token": median([r.get("decode_s_per_token") for r in ok]),
                        "peak_rss_bytes": median([r.get("peak_rss_bytes") for r in ok]),
                        "peak_device_bytes": median([r.get("peak_device_bytes") for r in ok]),
                        "loadavg_before": median([r.get("loadavg_before") for r in mine]),
                        "mean_threads": median([r.get("mean_threads") for r in ok]),
                        "errors": sorted(
                            {r["error"] for r in mine + splits if not r["ok"] and r.get("error")}
                        ),
                    }
                    outs = [r.get("output_ids") for r in ok]
                    row["deterministic"] = all(o == outs[0] for o in outs) if outs else None
                    if engine == "rabbit":
                        row["agree"] = None
                        row["rabbit_over_this"] = 1.0 if row["decode_s_per_token"] else None
                        if floor:
                            row["io_floor_s_per_token"] = floor.get("io_floor_s_per_token")
                            row["compute_s_per_token"] = floor.get("compute_s_per_token")
                            f = floor.get("floor_s_per_token") or floor.get("io_floor_s_per_token")
                            row["floor_s_per_token"] = f
                            row["bytes_streamed_per_token"] = floor.get("bytes_streamed_per_token")
                            row["read_bytes_per_s"] = floor.get("read_bytes_per_s")
                            if f and row["decode_s_per_token"]:
                                row["decode_over_floor"] = row["decode_s_per_token"] / f
                    else:
                        row["agree"] = agreement(rabbit_ref, outs[0] if outs else None)
                        d = row["decode_s_per_token"]
                        row["rabbit_over_this"] = rabbit_decode / d if rabbit_decode and d else None
                        row["patches"] = ok[0].get("patches") if ok else None
                    rows.append(row)
    return rows


def fmt_s(x: float | None) -> str:
    """Seconds with three significant digits."""
    return "—" if x is None else f"{x:.3g}"


def fmt_gib(x: float | None) -> str:
    """Bytes as GiB."""
    return "—" if x is None else f"{x / 2**30:.2f} GiB"


def render_markdown(rows: list[dict], meta: dict, runs: list[dict]) -> str:
    """The results table with the machine, workload and errors."""
    w = meta["workload"]
    m = meta["machine"]
    lines = [
        "# rabbit vs AirLLM 4.0.0, side by side",
        "",
        f"{meta['date']} · {m.get('cpu', '?')} · {m.get('cpus')} CPUs · "
        f"{fmt_gib(m.get('memory_bytes'))} RAM · {m.get('platform')} · device {w['device']}",
        f"rabbit: {meta.get('rabbit_version')} (git {meta.get('git_commit')}), "
        f"`{w['rabbit_args']}`",
        f"Workload: prompt {w['prompt_len']} tokens, {w['new_tokens']} new tokens, "
        f"{w['decoding']}; "
        f"medians of {w['reps']} runs per engine (each a fresh process, engines alternating); "
        f"split timed {w['split_reps']}× from scratch.",
        f"Command: `{meta['command']}`",
        f"Machine load: {w.get('busy', 0)} other process(es) spinning on a core during every "
        "timed run (`--busy`); load column: the 1-minute load average just before the runs "
        "(median).",
        "",
        "| model | batch | compression | engine | split s | load s | prefill s | decode s/token | "
        "peak RSS | tokens agree | rabbit/this decode | I/O floor | compute (resident) | "
        "decode/floor | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["runs_ok"] == 0:
            decode = "error: " + (r["errors"][0][:120] if r["errors"] else "?")
        else:
            decode = fmt_s(r["decode_s_per_token"])
            if r["runs_ok"] < r["runs"]:
                decode += f" ({r['runs_ok']}/{r['runs']} ok)"
        if r["engine"] == "rabbit":
            agree = "reference" if r["runs_ok"] else "—"
            ratio = "1" if r["runs_ok"] else "—"
        else:
            a = r.get("agree")
            agree = (
                "—"
                if a is None
                else f"{a['min']}/{a['of']}" + (f" (min of {r['batch']})" if r["batch"] > 1 else "")
            )
            x = r.get("rabbit_over_this")
            if x is None:
                ratio = "—"
            elif x < 1:
                ratio = f"{x:.3g} (rabbit {1 / x:.1f}× faster)"
            else:
                ratio = f"{x:.3g} (rabbit {x:.1f}× slower)"
        if r["deterministic"] is False:
            agree += " (reps differ)"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["preset"],
                    str(r["batch"]),
                    r["compression"],
                    ENGINE_LABELS.get(r["engine"], r["engine"]),
                    fmt_s(r["split_s"]),
                    fmt_s(r["load_s"]),
                    fmt_s(r["prefill_s"]),
                    decode,
                    fmt_gib(r["peak_rss_bytes"])
                    + (
                        f" (device {fmt_gib(r['peak_device_bytes'])})"
                        if r.get("peak_device_bytes")
                        else ""
                    ),
                    agree,
                    ratio,
                    fmt_s(r.get("io_floor_s_per_token")),
                    fmt_s(r.get("compute_s_per_token")),
                    "—" if r.get("decode_over_floor") is None else f"{r['decode_over_floor']:.2f}",
                    "—" if r.get("loadavg_before") is None else f"{r['loadavg_before']:.2f}",
                ]
            )
            + " |"
        )
    lines += [
        "",
        "- split s: first load with no split on disk, in a fresh process (rabbit: `load_s` of "
        "`rabbit generate`; AirLLM: `AutoModel.from_pretrained`, which splits). load s: the same "
        "with the split present, in the timed runs. Neither counts process start or imports.",
        "- prefill s: time to the first new token. decode s/token: median of the per-token step "
        "times (one step = one token for each of the batch's sequences).",
        "- peak RSS: `ru_maxrss` of the engine's process (on CUDA, AirLLM rows add torch's peak "
        "allocated device memory; rabbit does not report device memory yet). tokens agree: "
        "leading greedy tokens identical to rabbit's on the same prompt (random bf16 weights: "
        "rounding differences can flip a near-tie after a few steps; compressed rows use "
        "different quantizers).",
        "- rabbit/this decode: rabbit's decode s/token ÷ this row's. Floors (rabbit rows): I/O = "
        "bytes streamed per token ÷ read bandwidth of the same files; compute = decode step of a "
        "fully resident rabbit run of the same workload; decode/floor = decode ÷ "
        "max(I/O, compute).",
        "- rabbit, every layer resident: the same rabbit bench with every decoder layer kept "
        "resident (`--resident-layers` of `--rabbit-args` replaced). transformers: the "
        "checkpoint loaded whole by `AutoModelForCausalLM.from_pretrained`, the same greedy "
        "`generate()` (uncompressed cells only).",
        "- airllm-no-gc (patched): AirLLM with the `clean_memory()` (gc.collect + malloc_trim + "
        "empty_cache) it runs after every module replaced by a no-op at runtime; not shipped by "
        "AirLLM. CPU 4bit/8bit AirLLM rows: its compress/uncompress functions run with `.cuda()` "
        "replaced by `.to('cpu')` at runtime (same bitsandbytes calls).",
    ]
    errors = [r for r in runs if not r.get("ok")]
    if errors:
        lines += ["", "## Errors", ""]
        for r in errors:
            where = (
                f"{r['kind']} {r['engine']} {r['preset']} b{r.get('batch', '-')} "
                f"{r['compression']} rep {r.get('rep', '-')}"
            )
            lines.append(
                f"- {where}: `{r.get('error')}`" + (f" (log: {r['log']})" if r.get("log") else "")
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Checks the tools, runs the matrix, prints where the results are."""
    args = parse_args(argv)
    if not args.rabbit.exists():
        sys.exit(f"rabbit binary not found at {args.rabbit} (cargo build --release -p rabbit-cli)")
    if any(e in PYTHON_ENGINES for e in args.engines) and not args.python.exists():
        sys.exit(f"AirLLM venv python not found at {args.python} (benches/airllm/setup_venv.sh)")
    bench = Bench(args)
    log(f"results -> {args.out}")
    started = time.perf_counter()
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted: results so far are saved")
        bench.save()
        return 130
    bench.save()
    log(f"done in {time.perf_counter() - started:.0f} s: {args.out / 'results.md'}")
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
