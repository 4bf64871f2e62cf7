"""Speed and memory of explain() against a plain forward and the paper's formulation (CPU).

    python -m benchmarks.core_scaling                   # mamba-130m shape, T = 256, 1024, 4096
    python -m benchmarks.core_scaling --quick           # small shapes, seconds

Methods, each measured in its own subprocess (so peak memory is clean), batch 1:
    forward      HF ``MambaForCausalLM`` forward under ``torch.no_grad`` (the user's baseline)
    forward_lrp  the same forward under ``mambalrp.lrp`` (our re-implementation), no_grad
    explain      ``mambalrp.explain`` (one forward + one LRP backward)
    paper        the paper's formulation: materialised discretisation ``(b, d, T, n)`` and a
                 Python loop over time per layer, autograd through it (detached coefficients)

Writes ``benchmarks/results/core_scaling.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from typing import Any

METHODS = ("forward", "forward_lrp", "explain", "paper")
SEED = 0


def build_model(args: argparse.Namespace):
    """The random-weight MambaForCausalLM of ``args``' shape (seeded)."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(SEED)
    cfg = MambaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, state_size=args.d_state,
        num_hidden_layers=args.layers, expand=2, conv_kernel=4,
    )
    return MambaForCausalLM(cfg).eval()


def _paper_rules():
    import mambalrp
    from mambalrp.functional import selective_scan_ref

    class PaperRules(mambalrp.RuleSet):
        """MambaLRP rules, but the SSM as in the original code: loop over time, autograd."""

        def selective_scan(self, x, dt, A, B, C, D=None):
            return selective_scan_ref(x, dt, A, B, C, D, detach=True)

    return PaperRules(name="paper")


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run one (method, T) measurement in this process and return its numbers."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    import mambalrp
    from benchmarks.common import PeakMemory

    torch.set_num_threads(args.threads)
    model = build_model(args)
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, args.vocab, (1, args.T), generator=gen)
    warm = torch.randint(0, args.vocab, (1, 8), generator=gen)

    def run(tokens):
        if args.method == "forward":
            with torch.no_grad():
                return model(tokens, use_cache=False, logits_to_keep=1).logits
        if args.method == "forward_lrp":
            with torch.no_grad(), mambalrp.lrp(model):
                return model(tokens, use_cache=False, logits_to_keep=1).logits
        rules = _paper_rules() if args.method == "paper" else "mambalrp"
        return mambalrp.explain(model, tokens, rules=rules).relevance

    run(warm)
    times = []
    peak = 0
    for _ in range(args.repeats):
        gc.collect()
        with PeakMemory(limit=int(args.mem_limit_gb * 2**30)) as mem:
            start = time.perf_counter()
            run(ids)
            times.append(time.perf_counter() - start)
        peak = max(peak, mem.peak)
    return {"method": args.method, "T": args.T, "seconds": min(times), "all_seconds": times, "peak_mb": peak / 2**20}


def _spawn(args: argparse.Namespace, method: str, T: int) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "benchmarks.core_scaling", "--worker", "--method", method, "--T", str(T),
        "--d-model", str(args.d_model), "--layers", str(args.layers), "--d-state", str(args.d_state),
        "--vocab", str(args.vocab), "--repeats", str(args.repeats), "--threads", str(args.threads),
        "--mem-limit-gb", str(args.mem_limit_gb),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 99:
        return {"method": method, "T": T, "seconds": None, "peak_mb": None, "status": f"oom (> {args.mem_limit_gb} GB)"}
    if proc.returncode != 0:
        return {"method": method, "T": T, "seconds": None, "peak_mb": None, "status": "error", "stderr": proc.stderr[-2000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["status"] = "ok"
    return result


def _table(results: list[dict[str, Any]], lengths: list[int]) -> str:
    by = {(r["method"], r["T"]): r for r in results}
    lines = [
        "| T | " + " | ".join(f"{m} s" for m in METHODS) + " | " + " | ".join(f"{m} MB" for m in METHODS)
        + " | explain / forward | paper / explain |",
        "|---" * (2 * len(METHODS) + 3) + "|",
    ]
    for T in lengths:
        cells = [str(T)]
        for key in ("seconds", "peak_mb"):
            for m in METHODS:
                r = by.get((m, T))
                v = r.get(key) if r else None
                cells.append(f"{v:.2f}" if isinstance(v, float) else (r or {}).get("status", "-"))
        f, e, p = (by.get((m, T), {}).get("seconds") for m in ("forward", "explain", "paper"))
        cells.append(f"{e / f:.2f}x" if e and f else "-")
        cells.append(f"{p / e:.1f}x" if p and e else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(results: list[dict[str, Any]], path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m in METHODS:
        pts = sorted((r["T"], r["seconds"], r["peak_mb"]) for r in results if r["method"] == m and r.get("seconds"))
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=m)
    for ax, label in zip(axes, ("seconds", "peak memory above model (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("CPU, batch 1, random model shaped like mamba-130m")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--T", type=int)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=50280)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mem-limit-gb", type=float, default=16.0)
    parser.add_argument("--quick", action="store_true", help="tiny model and lengths (smoke run)")
    parser.add_argument("--name", default="core_scaling")
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.quick:
        args.d_model, args.layers, args.vocab, args.lengths, args.name = 64, 2, 256, [64, 256], args.name + "_quick"

    from benchmarks.common import RESULTS, machine_info, write_json, write_text

    results = []
    for T in args.lengths:
        for m in args.methods:
            r = _spawn(args, m, T)
            results.append(r)
            print(f"T={T:6d} {m:12s} {r.get('status'):>8s} seconds={r.get('seconds')} peak_mb={r.get('peak_mb')}", flush=True)
    payload = {
        "benchmark": "core_scaling",
        "config": {k: getattr(args, k) for k in ("d_model", "layers", "d_state", "vocab", "lengths", "repeats", "threads", "mem_limit_gb")},
        "seed": SEED,
        "machine": machine_info(),
        "results": results,
    }
    write_json(args.name, payload)
    table = _table(results, args.lengths)
    write_text(args.name + ".md", f"# {args.name}\n\nbatch 1, d_model {args.d_model}, {args.layers} layers, "
               f"d_state {args.d_state}, CPU threads {args.threads}. Peak memory is RSS above the loaded model.\n\n" + table)
    _plot(results, RESULTS / f"{args.name}.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
