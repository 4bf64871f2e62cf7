"""What verification costs: ``explain`` with verification (the first call, which runs the probe,
and later calls, which reuse the cached verdict) against ``explain(verify=False)``, side by side
in one process on the CPU.

    python -m benchmarks.verification_cost              # mamba-130m shape, T = 1024 (minutes)
    python -m benchmarks.verification_cost --quick      # small shape, seconds

Methods, on the same model and ids; ``unverified`` and ``later`` interleaved so that drift of a
noisy machine hits both alike:
    unverified   ``explain(model, ids, verify=False)``: no verification at all
    later        ``explain(model, ids)`` with the verdict cached (fingerprint and lookup only)
    first        ``explain(model, ids)`` right after ``mambalrp.forget(model)`` (probe included)
    fingerprint  ``mambalrp.fingerprint.fingerprint`` alone (plan and verdict are cached on it)

Writes ``benchmarks/results/verification_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

SEED = 0


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    import mambalrp
    from benchmarks.core_scaling import build_model
    from mambalrp.fingerprint import fingerprint

    torch.set_num_threads(args.threads)
    model = build_model(args)
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, args.vocab, (1, args.T), generator=gen)
    mambalrp.explain(model, ids[:, :8], verify=False)  # warm-up: imports, allocator

    times: dict[str, list[float]] = {"first": [], "unverified": [], "later": [], "fingerprint": []}
    for r in range(args.first_repeats):
        mambalrp.forget(model)
        times["first"].append(_timed(lambda: mambalrp.explain(model, ids)))
        print(f"first call {r + 1}/{args.first_repeats}: {times['first'][-1]:.3f}s", flush=True)
    for r in range(args.repeats):
        order = ("unverified", "later") if r % 2 == 0 else ("later", "unverified")
        for method in order:
            verify = method == "later"
            times[method].append(_timed(lambda verify=verify: mambalrp.explain(model, ids, verify=verify)))
        times["fingerprint"].append(_timed(lambda: fingerprint(model)))
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {times[k][-1]:.3f}s" for k in order), flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "times_s": times,
        "median_s": median,
        "later_over_unverified": median["later"] / median["unverified"],
        "first_over_unverified": median["first"] / median["unverified"],
        "fingerprint_share_of_explain": median["fingerprint"] / median["unverified"],
    }


def main(argv: list[str] | None = None) -> None:
    from benchmarks.common import RESULTS, machine_info

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=50280)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6, help="interleaved rounds of unverified / later")
    parser.add_argument("--first-repeats", type=int, default=2, help="first calls (after forget)")
    parser.add_argument("--quick", action="store_true", help="d_model 64, 2 layers, T = 256")
    parser.add_argument("--name", default="verification_cost")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.layers, args.vocab, args.T = 64, 2, 512, 256
    result = run(args)
    config = {k: getattr(args, k) for k in ("T", "d_model", "layers", "d_state", "vocab", "threads", "repeats", "first_repeats")}
    report = {"machine": machine_info(), "config": config, "seed": SEED, **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    m = result["median_s"]
    table = [
        "# Cost of verification (`benchmarks/verification_cost.py`)\n",
        f"Random-weight MambaForCausalLM, d_model {args.d_model}, {args.layers} layers, d_state {args.d_state}, "
        f"vocab {args.vocab}, T = {args.T}, batch 1, {args.threads} threads; medians of {args.repeats} interleaved rounds "
        f"(unverified, later) and {args.first_repeats} first calls.\n",
        "| method | median s | / unverified |",
        "|---|---|---|",
        f"| explain, verify=False | {m['unverified']:.3f} | 1.00x |",
        f"| explain, verdict cached (later calls) | {m['later']:.3f} | {result['later_over_unverified']:.3f}x |",
        f"| explain, first call (probe runs) | {m['first']:.3f} | {result['first_over_unverified']:.2f}x |",
        f"| fingerprint alone | {m['fingerprint'] * 1e3:.2f} ms | {result['fingerprint_share_of_explain'] * 100:.3f}% |",
    ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
