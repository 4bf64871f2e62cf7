"""Achieved memory bandwidth of the Mamba-1 scan kernels over their launch parameters.

For one shape (default: the mamba-130m mixer, ``d_inner`` 1536, ``d_state`` 16, batch 1,
T = 16k) it times every kernel, variant and launch configuration (``block_d``, ``block_t``,
``num_warps``) with CUDA events, checks each result against the chunked torch implementation, and
reports the bandwidth as the bytes a kernel must move (it reads ``x`` or ``g``, ``dt``, ``B``,
``C`` once and writes one ``(b, d, T)`` tensor) divided by its time. Two references: a large
device-to-device copy (read + write) and the memory's nominal peak from NVML when available.

Writes ``scan_kernel_sweep.json`` and ``scan_kernel_sweep.md`` to ``--out-dir``; the best
configuration per kernel and variant is listed first.

Usage (CUDA machine)::

    python benchmarks/scan_kernel_sweep.py
    python benchmarks/scan_kernel_sweep.py --d-inner 4096 --seq-len 16k --kernels bwd
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_scaling import copy_bandwidth, cuda_time, environment, parse_length  # noqa: E402


def nominal_peak_bandwidth() -> float | None:
    """Memory clock x bus width x 2 (double data rate) from NVML, in bytes per second."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        return 2.0 * clock_mhz * 1e6 * bus_bits / 8
    except Exception:  # noqa: BLE001 - NVML missing or not answering
        return None


def configurations(variant: str) -> list[dict[str, int]]:
    """Launch parameters tried for one variant.

    The tiled variant gets the full grid (``block_d * block_t <= 8192``) less the tiles with fewer
    elements than threads (replicated work) or more than 32 per thread (they spill registers on
    sm_90 and take up to minutes to compile); the chunked and sequential ones only the
    neighbourhood of their best configurations from an earlier H100 sweep (b 1, d_inner 1536,
    d_state 16, T 16k).
    """
    if variant == "tiled":
        return [
            {"block_d": bd, "block_t": bt, "num_warps": w}
            for bd, bt, w in itertools.product((1, 2, 4, 8, 16), (64, 128, 256, 512, 1024), (2, 4, 8))
            if bd * bt <= 8192 and 32 * w <= bd * bt <= 32 * 32 * w
        ]
    if variant == "chunked":
        best = [(2, 64, 2), (2, 32, 2), (2, 128, 4), (4, 64, 4), (4, 32, 4)]
        return [{"block_d": bd, "block_t": bt, "num_warps": w} for bd, bt, w in best]
    if variant == "sequential":
        return [{"block_d": bd, "num_warps": w} for bd, w in ((2, 1), (4, 1), (8, 1), (4, 2))]
    raise ValueError(f"unknown variant {variant!r}")


def explicit(text: str) -> dict[str, list[dict[str, int]]]:
    """Parse ``--configs`` (``variant:block_d:block_t:num_warps``, comma separated) per variant."""
    out: dict[str, list[dict[str, int]]] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        variant, bd, bt, w = item.split(":")
        cfg = {"block_d": int(bd), "num_warps": int(w)}
        if variant != "sequential":
            cfg["block_t"] = int(bt)
        out.setdefault(variant, []).append(cfg)
    return out


def selected(configs: list[dict[str, int]], args: argparse.Namespace) -> list[dict[str, int]]:
    """The configurations that pass the ``--block-d``, ``--block-t`` and ``--num-warps`` filters."""
    keep = {
        key: {int(v) for v in getattr(args, key).split(",") if v.strip()} for key in ("block_d", "block_t", "num_warps")
    }
    return [c for c in configs if all(not values or c.get(key, 1) in values for key, values in keep.items())]


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; returns 0 if every configuration that ran matched the torch result."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-inner", type=int, default=1536)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", default="16k")
    p.add_argument("--kernels", default="bwd,fwd", help="comma list of bwd, fwd")
    p.add_argument("--variants", default="tiled,chunked,sequential")
    p.add_argument("--block-d", default="", help="comma list: keep only configurations with these block_d")
    p.add_argument("--block-t", default="", help="comma list: keep only configurations with these block_t")
    p.add_argument("--num-warps", default="", help="comma list: keep only configurations with these num_warps")
    p.add_argument(
        "--configs",
        default="",
        help="explicit comma list of variant:block_d:block_t:num_warps (block_t 1 for sequential); "
        "replaces the built-in grid",
    )
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--name", default="scan_kernel_sweep")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("scan_kernel_sweep needs a CUDA device", file=sys.stderr)
        return 2

    from mambalrp import kernels
    from mambalrp.functional.selective_scan import selective_scan_fwd_torch, selective_scan_lrp_bwd_torch

    b, d, n, T = args.batch, args.d_inner, args.d_state, parse_length(args.seq_len)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    v = rand(b, d, T)
    dt = torch.nn.functional.softplus(rand(b, d, T) - 1.0)
    A = -torch.exp(rand(d, n) * 0.5)
    B, C, D = rand(b, n, T), rand(b, n, T), rand(d)
    moved = 4 * (3 * b * d * T + 2 * b * n * T + d * n + d)
    funcs = {"bwd": (kernels.selective_scan_lrp_bwd, selective_scan_lrp_bwd_torch),
             "fwd": (kernels.selective_scan_fwd, selective_scan_fwd_torch)}

    copy_bw, nominal = copy_bandwidth("cuda"), nominal_peak_bandwidth()
    report: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": args.seed,
        "shape": {"batch": b, "d_inner": d, "d_state": n, "seq_len": T},
        "bytes": moved,
        "copy_bandwidth_Bps": copy_bw,
        "nominal_bandwidth_Bps": nominal,
        "environment": environment("cuda"),
        "rows": [],
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = True
    print(f"copy {copy_bw / 1e9:.0f} GB/s, nominal {nominal and nominal / 1e9:.0f} GB/s, {moved / 1e6:.0f} MB per call",
          flush=True)
    for name in args.kernels.split(","):
        kernel, torch_impl = funcs[name]
        expected = torch_impl(v, dt, A, B, C, D)
        chosen = explicit(args.configs)
        for variant in chosen or args.variants.split(","):
            for cfg in chosen.get(variant) or selected(configurations(variant), args):
                row: dict[str, Any] = {"kernel": name, "variant": variant, **cfg}
                t0 = time.perf_counter()
                try:
                    def fn(cfg=cfg, variant=variant):
                        return kernel(v, dt, A, B, C, D, variant=variant, **cfg)

                    diff = float((fn() - expected).abs().max())
                    seconds = cuda_time(fn, args.repeats)
                    row.update(status="ok", time_s=seconds, bandwidth_Bps=moved / seconds,
                               fraction_of_copy=moved / seconds / copy_bw,
                               fraction_of_nominal=(moved / seconds / nominal) if nominal else None,
                               max_abs_diff=diff)
                    ok &= diff <= 1e-3 * float(expected.abs().max())
                except Exception as err:  # noqa: BLE001 - e.g. out of shared memory; recorded
                    row.update(status=f"error: {type(err).__name__}: {err}"[:200])
                row["wall_s"] = time.perf_counter() - t0
                report["rows"].append(row)
                if row["status"] == "ok":
                    print(f"{name} {variant} {cfg}: {row['time_s'] * 1e3:.3f} ms {row['bandwidth_Bps'] / 1e9:.0f} GB/s "
                          f"({100 * row['fraction_of_copy']:.1f}% of copy) diff {row['max_abs_diff']:.1e}", flush=True)
                else:
                    print(f"{name} {variant} {cfg}: {row['status']}", flush=True)
                (out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    good = sorted((r for r in report["rows"] if r["status"] == "ok"), key=lambda r: r["time_s"])
    lines = [
        f"# Scan kernel sweep: batch {b}, d_inner {d}, d_state {n}, T {T}",
        "",
        f"Device {report['environment'].get('gpu_name')}; copy {copy_bw / 1e9:.0f} GB/s"
        + (f", nominal {nominal / 1e9:.0f} GB/s" if nominal else "") + f"; {moved / 1e6:.0f} MB moved per call.",
        "",
        "| kernel | variant | block_d | block_t | num_warps | time (ms) | GB/s | of copy | of nominal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    best = {}
    for r in good:
        best.setdefault((r["kernel"], r["variant"]), r)
    for r in list(best.values()) + [r for r in good if r not in best.values()]:
        nom = f"{r['fraction_of_nominal']:.2f}" if r.get("fraction_of_nominal") else ""
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['block_d']} | {r.get('block_t', 1)} | {r['num_warps']} | "
                     f"{r['time_s'] * 1e3:.3f} | {r['bandwidth_Bps'] / 1e9:.0f} | {r['fraction_of_copy']:.2f} | {nom} |")
    (out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
