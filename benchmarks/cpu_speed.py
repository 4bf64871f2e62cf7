"""Side by side on CPU: the model's forward, MambaLRP and Gradient x Input, Mamba-1 and Mamba-2.

    python -m benchmarks.cpu_speed                      # 768-wide, 8 layers, T = 1024 and 4096
    python -m benchmarks.cpu_speed --quick              # small shapes, seconds

Models (random weights, seeded, batch 1): a ``MambaForCausalLM`` and a ``Mamba2ForCausalLM`` of
mamba-130m's width (d_model 768, d_inner 1536; Mamba-1 d_state 16; Mamba-2 24 heads of 64,
d_state 128, one group, chunk 256), ``--layers`` layers (8 by default; the ratios do not depend on
the depth), and the zoo's small models (``lm-mamba1``, ``lm-mamba2``, ``sst-mamba1``). Methods:

    forward     the model's own forward (transformers' torch path) under ``torch.no_grad``, logits
                of the last position only
    mambalrp    ``mambalrp.explain`` (verified; the verdict cached after the warm-up call)
    gradient    ``mambalrp.explain(rules="gradient")``: Gradient x Input

Every model gets one warm-up call per method; then the methods run interleaved, ``--repeats``
rounds, and the median is reported (the machine may be shared: ratios within one run are what
to compare). The load average is recorded before and after each model.

Writes ``benchmarks/results/cpu_speed.{json,md}`` (``cpu_speed_quick.*`` with ``--quick``; ``--name``
changes the stem).
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import time
from typing import Any, Callable

SEED = 0
METHODS = ("forward", "mambalrp", "gradient")
ZOO = ("lm-mamba1", "lm-mamba2", "sst-mamba1")


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def build(family: str, width: int, layers: int, vocab: int):
    """A random-weight causal LM of ``family`` (``"mamba1"`` or ``"mamba2"``), seeded."""
    import torch
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    torch.manual_seed(SEED)
    if family == "mamba1":
        cfg = MambaConfig(vocab_size=vocab, hidden_size=width, state_size=16, num_hidden_layers=layers,
                          expand=2, conv_kernel=4, use_cache=False)
        return MambaForCausalLM(cfg).eval()
    head_dim = 64 if width >= 128 else 16
    cfg = Mamba2Config(vocab_size=vocab, hidden_size=width, state_size=128 if width >= 128 else 16,
                       num_hidden_layers=layers, expand=2, head_dim=head_dim, num_heads=2 * width // head_dim,
                       n_groups=1, conv_kernel=4, chunk_size=256 if width >= 128 else 32, use_cache=False)
    return Mamba2ForCausalLM(cfg).eval()


def methods(model, ids) -> dict[str, Callable[[], Any]]:
    """The measured callables for one model and input."""
    import torch

    import mambalrp

    # The signature (not ``__code__``): transformers wraps ``forward`` in decorators, whose code
    # object does not list ``logits_to_keep``; the forward must compute the last logits only, as
    # ``explain`` does.
    params = inspect.signature(model.forward).parameters
    kwargs = {name: value for name, value in (("use_cache", False), ("logits_to_keep", 1)) if name in params}

    def forward():
        with torch.no_grad():
            return model(ids, **kwargs)

    return {
        "forward": forward,
        "mambalrp": lambda: mambalrp.explain(model, ids).relevance,
        "gradient": lambda: mambalrp.explain(model, ids, rules="gradient").relevance,
    }


def measure(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """Warm up each callable once, then time them interleaved; medians and all runs."""
    for fn in fns.values():
        fn()
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {k: {"median_s": statistics.median(v), "runs_s": [round(t, 4) for t in v]} for k, v in runs.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and write the result files."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50280)
    p.add_argument("--seq-lens", default="1024,4096")
    p.add_argument("--families", default="mamba1,mamba2")
    p.add_argument("--zoo", default=",".join(ZOO), help="zoo models (empty for none)")
    p.add_argument("--zoo-seq-len", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="width 64, 2 layers, T = 128, zoo at 256 tokens, 2 repeats")
    p.add_argument("--name", default="cpu_speed")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.vocab, args.seq_lens, args.zoo_seq_len, args.repeats = 64, 2, 1000, "128", 256, 2
        if args.name == "cpu_speed":
            args.name = "cpu_speed_quick"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import torch

    from benchmarks.common import machine_info, write_json, write_text

    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(SEED)
    for family in [f for f in args.families.split(",") if f]:
        model = build(family, args.width, args.layers, args.vocab)
        for T in (int(t) for t in args.seq_lens.split(",")):
            ids = torch.randint(0, args.vocab, (1, T), generator=gen)
            rows.append(_row(f"{family}, d_model {args.width}, {args.layers} layers", T, model, ids, args.repeats))
            print(_line(rows[-1]), flush=True)
    if args.zoo:
        from mambalrp.explain import input_embedding
        from mambalrp.models.zoo import load_model

        for name in args.zoo.split(","):
            model, _ = load_model(name)
            vocab = input_embedding(model).num_embeddings
            ids = torch.randint(2, vocab, (1, args.zoo_seq_len), generator=gen)
            rows.append(_row(f"zoo {name}", args.zoo_seq_len, model, ids, args.repeats))
            print(_line(rows[-1]), flush=True)

    payload = {
        "benchmark": "cpu_speed",
        "config": {k: v for k, v in vars(args).items()},
        "seed": SEED,
        "machine": machine_info(),
        "rows": rows,
    }
    write_json(args.name, payload)
    write_text(f"{args.name}.md", markdown(rows))
    print(markdown(rows))
    return 0


def _row(model_name: str, T: int, model, ids, repeats: int) -> dict[str, Any]:
    before = load_average()
    timing = measure(methods(model, ids), repeats)
    f, m, g = (timing[k]["median_s"] for k in METHODS)
    return {
        "model": model_name, "T": T, "timing": timing, "load_before": before, "load_after": load_average(),
        "mambalrp_over_forward": m / f, "gradient_over_forward": g / f, "gradient_over_mambalrp": g / m,
    }


def _line(row: dict[str, Any]) -> str:
    t = row["timing"]
    return (f"{row['model']} T={row['T']}: forward {t['forward']['median_s']:.3f} s, mambalrp {t['mambalrp']['median_s']:.3f} s, "
            f"gradient {t['gradient']['median_s']:.3f} s; mambalrp/forward {row['mambalrp_over_forward']:.2f}x, "
            f"gradient/mambalrp {row['gradient_over_mambalrp']:.2f}x (load {row['load_before'][0]} -> {row['load_after'][0]})")


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table: medians, and the ratios of the fastest runs (on a busy
    machine single runs can be several times slower; the fastest run is the least disturbed)."""
    lines = [
        "| model | T | forward s | explain (MambaLRP) s | Gradient x Input s | MambaLRP / forward | GI / MambaLRP "
        "| fastest runs: MambaLRP / forward | fastest runs: GI / MambaLRP | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["timing"]
        fastest = {k: min(t[k]["runs_s"]) for k in METHODS}
        lines.append(
            f"| {r['model']} | {r['T']} | {t['forward']['median_s']:.3f} | {t['mambalrp']['median_s']:.3f} | "
            f"{t['gradient']['median_s']:.3f} | {r['mambalrp_over_forward']:.2f}x | {r['gradient_over_mambalrp']:.2f}x | "
            f"{fastest['mambalrp'] / fastest['forward']:.2f}x | {fastest['gradient'] / fastest['mambalrp']:.2f}x | "
            f"{r['load_before'][0]} -> {r['load_after'][0]} |"
        )
    return "\n".join(lines) + "\n"


def rewrite_markdown(name: str = "cpu_speed") -> None:
    """Rewrite ``<name>.md`` from ``<name>.json``."""
    import json

    from benchmarks.common import RESULTS, write_text

    rows = json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))["rows"]
    write_text(f"{name}.md", markdown(rows))


if __name__ == "__main__":
    raise SystemExit(main())
