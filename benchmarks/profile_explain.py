"""Where ``explain`` spends its time: a torch.profiler table of one forward and one explain call.

Random-weight ``MambaForCausalLM`` shaped like mamba-130m (or ``--model 1.4b``), batch 1. Prints
and writes (``--out``) the operators sorted by device time (CUDA) or CPU time, for the plain
forward under ``mambalrp.lrp`` and for ``mambalrp.explain``.

Usage::

    python benchmarks/profile_explain.py --seq-len 4k --out benchmarks/results/profile_explain.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_scaling import MODELS, build_model, parse_length  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Profile one forward and one explain call after a warm-up; print the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="130m", choices=sorted(MODELS))
    p.add_argument("--seq-len", default="4k")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import mambalrp

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.model, torch.float32, device, 0)
    T = parse_length(args.seq_len)
    ids = torch.randint(0, MODELS[args.model]["vocab_size"], (1, T), device=device)

    def forward():
        with torch.no_grad(), mambalrp.lrp(model):
            return model(ids, use_cache=False, logits_to_keep=1).logits

    def explain():
        return mambalrp.explain(model, ids, recompute=args.recompute).relevance

    activities = [torch.profiler.ProfilerActivity.CPU]
    sort = "cpu_time_total"
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "cuda_time_total"
    text = []
    for name, fn in (("forward", forward), ("explain", explain)):
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by=sort, row_limit=args.rows)
        text.append(f"## {name}, {args.model}, T={T}\n{table}")
    report = "\n".join(text)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
