"""Explaining a generation: ``explain_generation`` against one ``explain`` call per generated token.

    python -m benchmarks.generation                       # zoo lm-mamba1 + mamba-130m shape (minutes)
    python -m benchmarks.generation --quick               # small shapes, seconds

For each model: a prompt of ``--prompt`` tokens and a greedy continuation of ``--new`` tokens
(produced once, untimed), then, on the same model, prompt and continuation:

    separate     one ``mambalrp.explain(model, sequence[:, :P + i], target=token_i)`` per step
                 (what one writes by hand: about 20 lines with the bookkeeping)
    generation   ``mambalrp.explain_generation(model, prompt, continuation=tokens)``
    greedy       ``mambalrp.explain_generation(model, prompt, max_new_tokens=N)``: generation
                 (no cache: the prefix is recomputed each step) plus explanation

Verification verdicts for every length bucket are cached before timing (both methods use them).
``separate`` and ``generation`` alternate over ``--repeats`` rounds; medians are reported, with the
largest absolute difference between the two relevance matrices, also relative to the largest
absolute explained logit.

Writes ``benchmarks/results/generation.{json,md}`` (``generation_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

SEED = 0


def _timed(fn) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _timed_both(fn) -> tuple[float, float, Any]:
    """Wall-clock and process CPU seconds (the CPU time is what a shared machine disturbs least)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def _models(args: argparse.Namespace) -> list[tuple[str, Any, str]]:
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    from mambalrp.models.zoo import available_models, load_model

    out = []
    for name in args.zoo:
        if name in available_models():
            model, _ = load_model(name)
            out.append((name, model, f"zoo {name}"))
    if args.layers > 0:
        torch.manual_seed(SEED)
        cfg = MambaConfig(
            vocab_size=args.vocab, hidden_size=args.d_model, state_size=16, num_hidden_layers=args.layers,
            expand=2, conv_kernel=4,
        )
        shape = f"random MambaForCausalLM d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}"
        out.append((f"mamba-{args.d_model}x{args.layers}", MambaForCausalLM(cfg).eval(), shape))
    return out


def measure(name: str, model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Time both methods on one model and compare their numbers."""
    import torch

    import mambalrp
    from mambalrp.generation import default_steps_per_backward

    gen = torch.Generator().manual_seed(SEED)
    vocab = model.get_input_embeddings().num_embeddings
    prompt = torch.randint(2, vocab, (1, args.prompt), generator=gen)
    P, N = args.prompt, args.new
    # Untimed: the continuation, and the verdict of every length bucket both methods touch.
    first = mambalrp.explain_generation(model, prompt, max_new_tokens=N, progress=False)
    tokens = first.generated_ids
    sequence = first.input_ids
    for length in range(P, P + N):
        if length == P or (length & (length - 1)) == 0:
            mambalrp.explain(model, sequence[:, :length])
    greedy_s, again = _timed(lambda: mambalrp.explain_generation(model, prompt, max_new_tokens=N, progress=False))
    assert torch.equal(again.generated_ids, tokens), "greedy generation is not deterministic"

    def separate() -> torch.Tensor:
        rows = torch.zeros(N, P + N)
        for i in range(N):
            e = mambalrp.explain(model, sequence[:, : P + i], target=int(tokens[i]))
            rows[i, : P + i] = e.relevance[0]
        return rows

    def batched() -> torch.Tensor:
        return mambalrp.explain_generation(
            model, prompt, continuation=tokens, steps_per_backward=args.steps_per_backward, progress=False
        ).relevance

    times: dict[str, list[float]] = {"separate": [], "generation": []}
    cpu: dict[str, list[float]] = {"separate": [], "generation": []}
    results: dict[str, torch.Tensor] = {}
    for r in range(args.repeats):
        order = ("separate", "generation") if r % 2 == 0 else ("generation", "separate")
        for method in order:
            seconds, cpu_seconds, rel = _timed_both(separate if method == "separate" else batched)
            times[method].append(seconds)
            cpu[method].append(cpu_seconds)
            results[method] = rel
        print(f"{name} round {r + 1}/{args.repeats}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in order), flush=True)
    diff = (results["separate"] - results["generation"]).abs().max().item()
    scale = first.logit.abs().max().item()
    median = {k: statistics.median(v) for k, v in times.items()}
    median_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    k = args.steps_per_backward or default_steps_per_backward(P + N)
    return {
        "model": name,
        "prompt_tokens": P,
        "new_tokens": N,
        "steps_per_backward": k,
        "times_s": times,
        "cpu_s": cpu,
        "median_s": median,
        "median_cpu_s": median_cpu,
        "cpu_speedup": median_cpu["separate"] / median_cpu["generation"],
        "greedy_with_generation_s": greedy_s,
        "speedup": median["separate"] / median["generation"],
        "max_abs_diff": diff,
        "max_abs_logit": scale,
        "max_rel_diff": diff / scale if scale else diff,
    }


def markdown(payload: dict[str, Any]) -> str:
    """The results table."""
    lines = [
        "| model | prompt + new tokens | steps per backward | 64 x `explain` s | `explain_generation` s | speed-up | speed-up (CPU time) | greedy incl. generation s | max abs diff | / max abs logit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["results"]:
        lines.append(
            f"| {r['description']} | {r['prompt_tokens']} + {r['new_tokens']} | {r['steps_per_backward']} | "
            f"{r['median_s']['separate']:.2f} | {r['median_s']['generation']:.2f} | **{r['speedup']:.1f}x** | "
            f"{r['cpu_speedup']:.1f}x | "
            f"{r['greedy_with_generation_s']:.2f} | {r['max_abs_diff']:.2e} | {r['max_rel_diff']:.2e} |"
        )
    if payload["results"] and payload["results"][0]["new_tokens"] != 64:
        lines[0] = lines[0].replace("64 x", f"{payload['results'][0]['new_tokens']} x")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    from benchmarks.common import machine_info, write_json, write_text

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--zoo", nargs="*", default=["lm-mamba1"])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24, help="0 skips the random mamba-130m-shaped model")
    parser.add_argument("--vocab", type=int, default=50280)
    parser.add_argument("--steps-per-backward", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small shapes: seconds")
    parser.add_argument("--name", default=None, help="result file stem (default generation[_quick])")
    args = parser.parse_args(argv)
    if args.quick:
        args.new, args.prompt, args.d_model, args.layers, args.vocab, args.repeats = 8, 8, 64, 2, 512, 1
    torch.set_num_threads(args.threads)
    import mambalrp

    results = []
    for name, model, description in _models(args):
        result = measure(name, model, args)
        result["description"] = description
        results.append(result)
    payload = {
        "config": {**vars(args), "seed": SEED},
        "machine": machine_info(),
        "mambalrp": mambalrp.__version__,
        "results": results,
    }
    stem = args.name or ("generation_quick" if args.quick else "generation")
    write_json(stem, payload)
    write_text(f"{stem}.md", markdown(payload))
    print(markdown(payload))
    return payload


if __name__ == "__main__":
    main()
