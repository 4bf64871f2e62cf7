"""Cost of explaining a gated delta-rule hybrid: ``explain`` against the model's own forward, on
the CPU, for a small Qwen3-Next-shaped model (random weights).

    python -m benchmarks.delta_scaling                 # T = 1024 (about a minute)
    python -m benchmarks.delta_scaling --T 256 --repeats 3

Model (``Qwen3NextConfig``): hidden 256, 4 layers (3 Gated DeltaNet, then 1 gated attention),
Gated DeltaNet with 2 key heads and 4 value heads of 64 channels, conv kernel 4; attention with 4
query heads and 2 key/value heads of 64; every layer's MLP a sparse MoE (8 experts of 128, top 2,
gated shared expert of 128); vocabulary 1024; float32, batch 1.

Methods, interleaved so that drift of a noisy machine hits both alike:
    forward     ``model(ids, use_cache=False)`` under ``torch.no_grad()`` (transformers' torch path)
    explain     ``mambalrp.explain(model, ids)`` (default rules; verdict cached after a first call)
    unverified  ``mambalrp.explain(model, ids, verify=False)``
    explain_cp  ``mambalrp.explain(model, ids, rules=MAMBALRP.with_attention("cp"))`` (attention
                weights held constant: the attention layer's backward is one product, not three)

Writes ``benchmarks/results/delta_scaling.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

SEED = 0


def build_model(vocab: int = 1024):
    """The Qwen3-Next-shaped model described in the module docstring, randomised."""
    import transformers as T

    from mambalrp.testing import randomise

    cfg = T.Qwen3NextConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=128, shared_expert_intermediate_size=128,
        decoder_sparse_step=1, layer_types=["linear_attention"] * 3 + ["full_attention"],
    )
    model = randomise(T.Qwen3NextForCausalLM(cfg), SEED)
    import torch

    with torch.no_grad():  # (1 + weight) norms: weights near 0
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and "linear_attn" not in name:
                p.mul_(0.0).add_(0.1 * torch.randn_like(p))
    return model


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    import mambalrp
    from benchmarks.common import machine_info

    torch.set_num_threads(args.threads)
    model = build_model()
    ids = torch.randint(0, 1024, (1, args.T), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        model(ids, use_cache=False)  # warm-up
    cp = mambalrp.MAMBALRP.with_attention("cp")
    first = _timed(lambda: mambalrp.explain(model, ids))  # plan, probe and verdict for this bucket
    mambalrp.explain(model, ids, rules=cp)
    times: dict[str, list[float]] = {"forward": [], "explain": [], "unverified": [], "explain_cp": []}
    for r in range(args.repeats):
        order = ["forward", "explain", "unverified", "explain_cp"]
        if r % 2:
            order.reverse()
        for method in order:
            if method == "forward":
                def fn():
                    with torch.no_grad():
                        model(ids, use_cache=False)
            elif method == "explain_cp":
                def fn():
                    mambalrp.explain(model, ids, rules=cp)
            else:
                def fn(verify=method == "explain"):
                    mambalrp.explain(model, ids, verify=verify)
            times[method].append(_timed(fn))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    exp = mambalrp.explain(model, ids)
    return {
        "benchmark": "delta_scaling",
        "model": "Qwen3-Next shape: hidden 256, 3 Gated DeltaNet + 1 gated attention layers, 2 key / 4 value heads of 64, MoE 8x128 top 2 + shared 128, vocab 1024",
        "T": args.T,
        "repeats": args.repeats,
        "threads": args.threads,
        "first_explain_s": first,
        "times_s": times,
        "median_s": median,
        "ratio_explain_over_forward": median["explain"] / median["forward"],
        "ratio_unverified_over_forward": median["unverified"] / median["forward"],
        "ratio_explain_cp_over_forward": median["explain_cp"] / median["forward"],
        "relative_conservation_error_attnlrp": (exp.conservation_delta.abs() / exp.logit.abs()).max().item(),
        "machine": machine_info(),
    }


def write(result: dict[str, Any], stem: str) -> None:
    from benchmarks.common import RESULTS

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["median_s"]
    lines = [
        "# Explaining a Qwen3-Next-shaped model on the CPU",
        "",
        f"{result['model']}; T = {result['T']}, batch 1, float32, {result['threads']} threads, median of {result['repeats']}.",
        "",
        "| method | median (s) | / forward |",
        "|---|---|---|",
        f"| forward (transformers' torch path, no grad) | {m['forward']:.3f} | 1.00 |",
        f"| explain (verified, verdict cached) | {m['explain']:.3f} | {m['explain'] / m['forward']:.2f} |",
        f"| explain(verify=False) | {m['unverified']:.3f} | {m['unverified'] / m['forward']:.2f} |",
        f"| explain, CP attention (verified) | {m['explain_cp']:.3f} | {m['explain_cp'] / m['forward']:.2f} |",
        "",
        f"First call (plan, probe and verdict): {result['first_explain_s']:.3f} s. "
        f"Relative conservation error under the default rules (AttnLRP, biases present): "
        f"{result['relative_conservation_error_attnlrp']:.2e}.",
        "",
        f"Machine: {result['machine'].get('cpu_model')}, torch {result['machine']['torch']}, "
        f"transformers {result['machine'].get('transformers')}.",
        "",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="delta_scaling")
    args = parser.parse_args()
    result = run(args)
    write(result, args.out)
    print(f"explain / forward = {result['ratio_explain_over_forward']:.2f} (unverified {result['ratio_unverified_over_forward']:.2f})")


if __name__ == "__main__":
    main()
