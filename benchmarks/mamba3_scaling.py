"""Speed of explain() on a Mamba-3 language model against its forward (CPU), SISO and MIMO.

    python -m benchmarks.mamba3_scaling                  # 130m shape (d_model 768), T = 1024
    python -m benchmarks.mamba3_scaling --quick          # small shapes, seconds

The model is mamba_ssm's ``MambaLMHeadModel`` with its mixers replaced by ``Mamba3`` modules
(docs/mamba3.md): d_model 768, d_state 128, head dim 64, expand 2, vocabulary 50280, RMSNorm
blocks, ``--layers`` layers (24 in the 130m models; fewer with ``--layers``, stated in the
results), random weights, batch 1. MIMO uses rank 4.

mamba_ssm's own Mamba-3 forward runs only on a GPU (Triton with TMA descriptors, TileLang), and
its RMSNorm is a Triton kernel too, so on a CPU nothing of the model's own forward can run. The
baseline "forward" is therefore our pure-torch re-implementation of the whole model: the model
under ``mambalrp.lrp(model, rules="gradient")`` in ``torch.no_grad()`` (the same values as the
official forward; see tests/test_mamba3.py). "explain" is ``mambalrp.explain(model, ids,
verify=False)`` (one forward under the rules and one backward; the verification needs the
model's own forward, which cannot run here). Each number is the median of ``--repeats`` runs
after one warm-up (for explain, the call that gives the conservation error).

mamba_ssm cannot be imported on a machine without its CUDA extension ``selective_scan_cuda``;
this script then registers an empty placeholder module under that name before importing it.
Nothing of the placeholder is ever called: only the modules' constructors run.

Writes ``benchmarks/results/mamba3_scaling.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import types
from typing import Any

from benchmarks.common import RESULTS, machine_info

SEED = 0
FLOOR = 2.5


def mamba_ssm_classes():
    """``(Mamba3, MambaConfig, MambaLMHeadModel)`` from mamba_ssm (see the module docstring)."""
    if "selective_scan_cuda" not in sys.modules and importlib.util.find_spec("selective_scan_cuda") is None:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.modules import mamba3

    return mamba3.Mamba3, MambaConfig, MambaLMHeadModel


def build_model(args: argparse.Namespace, mimo: bool):
    """The random-weight Mamba-3 LM of ``args``' shape (seeded)."""
    import torch

    Mamba3, MambaConfig, MambaLMHeadModel = mamba_ssm_classes()
    torch.manual_seed(SEED)
    config = MambaConfig(
        d_model=args.d_model, n_layer=args.layers, vocab_size=args.vocab, ssm_cfg={"layer": "Mamba1", "d_state": 1},
        rms_norm=True, fused_add_norm=True, residual_in_fp32=True, pad_vocab_size_multiple=8,
    )
    model = MambaLMHeadModel(config)
    mixer_cfg = dict(d_state=args.d_state, headdim=args.headdim, expand=2)
    if mimo:
        mixer_cfg.update(is_mimo=True, mimo_rank=args.rank, chunk_size=64 // args.rank)
    for i, block in enumerate(model.backbone.layers):
        block.mixer = Mamba3(args.d_model, layer_idx=i, **mixer_cfg)
    return model.eval()


def _median_time(fn, repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args: argparse.Namespace, mimo: bool) -> dict[str, Any]:
    import torch

    import mambalrp

    model = build_model(args, mimo)
    ids = torch.randint(0, args.vocab, (1, args.T), generator=torch.Generator().manual_seed(SEED))

    def forward():
        with torch.no_grad(), mambalrp.lrp(model, rules="gradient"):
            return model(ids).logits

    def explain():
        return mambalrp.explain(model, ids, verify=False)

    exp = explain()  # also the explain's warm-up
    t_forward = _median_time(forward, args.repeats)
    print(f"{'MIMO' if mimo else 'SISO'}: forward {t_forward:.2f} s", flush=True)
    t_explain = _median_time(explain, args.repeats, warm_up=False)
    print(f"{'MIMO' if mimo else 'SISO'}: explain {t_explain:.2f} s", flush=True)
    rel = (exp.conservation_delta.abs() / exp.logit.abs()).max().item()
    return {
        "variant": "MIMO" if mimo else "SISO",
        "rank": args.rank if mimo else 1,
        "forward_s": t_forward,
        "explain_s": t_explain,
        "ratio": t_explain / t_forward,
        "conservation_relative_error": rel,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    args.d_model, args.d_state, args.headdim, args.vocab, args.rank = 768, 128, 64, 50280, 4
    if args.quick:
        args.d_model, args.d_state, args.headdim, args.vocab, args.layers, args.T = 64, 16, 16, 256, 2, 128

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(args, mimo) for mimo in (False, True)]
    result = {
        "shape": {k: getattr(args, k) for k in ("d_model", "d_state", "headdim", "layers", "vocab", "T", "rank")},
        "floor_ratio": FLOOR,
        "rows": rows,
        "machine": machine_info(),
    }
    name = "mamba3_scaling_quick" if args.quick else "mamba3_scaling"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    shape = result["shape"]
    lines = [
        f"# Mamba-3 explain vs forward (CPU, {result['machine'].get('torch_threads')} threads)",
        "",
        f"d_model {shape['d_model']}, d_state {shape['d_state']}, head dim {shape['headdim']}, "
        f"{shape['layers']} layers, vocabulary {shape['vocab']}, T = {shape['T']}, batch 1. "
        "forward: our pure-torch forward (the official one needs a GPU); explain: "
        f"`mambalrp.explain(verify=False)`. Floor: explain/forward <= {FLOOR}.",
        "",
        "| variant | forward (s) | explain (s) | explain / forward | conservation (relative) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        label = r["variant"] + (f" (rank {r['rank']})" if r["variant"] == "MIMO" else "")
        lines.append(
            f"| {label} | {r['forward_s']:.2f} | {r['explain_s']:.2f} | {r['ratio']:.2f} | "
            f"{r['conservation_relative_error']:.1e} |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
