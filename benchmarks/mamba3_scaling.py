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
after one warm-up (for explain, the call that gives the conservation error), in process CPU
seconds (the machine these were taken on is shared; wall seconds are in the JSON), one thread by
default. "forward (last)" is the forward computing the logits of the last position only
(``num_last_tokens=1``), as explain does for the explained position.

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


def _median_time(fn, repeats: int, warm_up: bool = True) -> tuple[float, float]:
    """Median ``(wall seconds, process CPU seconds)`` of ``repeats`` calls of ``fn``."""
    if warm_up:
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def measure(args: argparse.Namespace, mimo: bool) -> dict[str, Any]:
    import torch

    import mambalrp

    model = build_model(args, mimo)
    ids = torch.randint(0, args.vocab, (1, args.T), generator=torch.Generator().manual_seed(SEED))
    name = "MIMO" if mimo else "SISO"

    def forward(**kwargs):
        with torch.no_grad(), mambalrp.lrp(model, rules="gradient"):
            return model(ids, **kwargs).logits

    def explain():
        return mambalrp.explain(model, ids, verify=False)

    exp = explain()  # also the explain's warm-up
    row: dict[str, Any] = {"variant": name, "rank": args.rank if mimo else 1}
    for key, fn, warm in (
        ("forward", forward, True),
        ("forward_last", lambda: forward(num_last_tokens=1), True),
        ("explain", explain, False),
    ):
        row[key + "_s"], row[key + "_cpu_s"] = _median_time(fn, args.repeats, warm_up=warm)
        print(f"{name}: {key} {row[key + '_s']:.2f} s wall, {row[key + '_cpu_s']:.2f} s CPU", flush=True)
    row["ratio"] = row["explain_cpu_s"] / row["forward_cpu_s"]
    row["ratio_last"] = row["explain_cpu_s"] / row["forward_last_cpu_s"]
    row["ratio_wall"] = row["explain_s"] / row["forward_s"]
    row["conservation_relative_error"] = (exp.conservation_delta.abs() / exp.logit.abs()).max().item()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU time is measured)")
    args = parser.parse_args(argv)
    args.d_model, args.d_state, args.headdim, args.vocab, args.rank = 768, 128, 64, 50280, 4
    if args.quick:
        args.d_model, args.d_state, args.headdim, args.vocab, args.layers, args.T = 64, 16, 16, 256, 2, 128

    import torch

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
        f"# Mamba-3 explain vs forward (CPU, {args.threads} thread(s))",
        "",
        f"d_model {shape['d_model']}, d_state {shape['d_state']}, head dim {shape['headdim']}, "
        f"{shape['layers']} layers, vocabulary {shape['vocab']}, T = {shape['T']}, batch 1. "
        "forward: our pure-torch forward of the whole model (the official one needs a GPU), all logits; "
        "forward (last): the same with `num_last_tokens=1`; explain: `mambalrp.explain(verify=False)` "
        "(it computes the head at the explained position only). Process CPU seconds (the machine is "
        f"shared; wall seconds in the JSON). Floor: explain / forward <= {FLOOR}.",
        "",
        "| variant | forward (s) | forward, last logits (s) | explain (s) | explain / forward | "
        "explain / forward (last) | conservation (relative) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = r["variant"] + (f" (rank {r['rank']})" if r["variant"] == "MIMO" else "")
        lines.append(
            f"| {label} | {r['forward_cpu_s']:.2f} | {r['forward_last_cpu_s']:.2f} | {r['explain_cpu_s']:.2f} | "
            f"{r['ratio']:.2f} | {r['ratio_last']:.2f} | {r['conservation_relative_error']:.1e} |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
