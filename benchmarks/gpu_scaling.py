"""Time and peak GPU memory of MambaLRP against sequence length, and the scan kernels' bandwidth.

Random-weight ``transformers.MambaForCausalLM`` models shaped like mamba-130m (d_model 768,
24 layers) and mamba-1.4b (d_model 2048, 48 layers), both with d_state 16 and vocabulary 50280,
batch 1. For every model and sequence length it measures:

* ``forward``: the forward pass under ``torch.no_grad()`` inside ``mambalrp.lrp(model)`` (the
  project's own re-implementation of the mixers, with the chosen scan backend);
* ``hf_forward``: the transformers forward under ``torch.no_grad()`` (without mamba_ssm installed
  this is transformers' torch path, which materialises ``(b, d, T, n)`` tensors);
* ``explain``: ``mambalrp.explain(model, ids)``, one forward and one backward pass;
* ``explain_recompute``: ``mambalrp.explain(model, ids, recompute=True)``, which keeps only each
  layer's input and recomputes the layer in the backward (for lengths that do not fit otherwise);
* ``explain_partial``: the same with ``recompute=<--recompute-share>``, recomputing only that
  share of the layers (evenly spaced);
* ``paper_ref``: the same explanation with every selective scan replaced by autograd through the
  sequential reference ``selective_scan_ref(..., detach=True)``, the formulation of the original
  MambaLRP code (memory ``O(b * d * T * n)`` per layer).

Out-of-memory errors are recorded as ``"oom"`` and longer sequences of the same series are then
skipped. At T = 16k it also measures the achieved memory bandwidth of the selective-scan kernels,
both variants (bytes read and written / time), against the bandwidth of a large
device-to-device copy.

Writes ``gpu_scaling.json`` (machine, versions, seed, all rows), ``gpu_scaling.md`` (tables) and
``gpu_scaling.png`` (if matplotlib is installed) to ``--out-dir``.

Usage::

    python benchmarks/gpu_scaling.py                       # full run on a CUDA device
    python benchmarks/gpu_scaling.py --models 130m --seq-lens 1k,4k,16k
    python benchmarks/gpu_scaling.py --tiny                # seconds on CPU, smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

MODELS: dict[str, dict[str, int]] = {
    "130m": {"hidden_size": 768, "num_hidden_layers": 24, "state_size": 16, "vocab_size": 50280},
    "1.4b": {"hidden_size": 2048, "num_hidden_layers": 48, "state_size": 16, "vocab_size": 50280},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "state_size": 16, "vocab_size": 1000},
}
METHODS = ("forward", "hf_forward", "explain", "explain_recompute", "explain_partial", "paper_ref")
# Methods whose scans run through the selected backend; the others are measured once per model.
BACKEND_METHODS = ("forward", "explain", "explain_recompute", "explain_partial")


def parse_length(text: str) -> int:
    """Parse ``"4k"``, ``"128K"`` or ``"1000"`` into a number of tokens (k = 1024)."""
    text = text.strip().lower()
    if text.endswith("k"):
        return int(float(text[:-1]) * 1024)
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--tiny`` replaces the defaults by a seconds-long CPU run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="130m,1.4b", help="comma list of: " + ", ".join(MODELS))
    p.add_argument("--seq-lens", default=None, help="comma list, k = 1024 (default 1k,4k,16k,64k,128k)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of: " + ", ".join(METHODS))
    p.add_argument("--backends", default=None, help="scan backends for forward/explain (default triton,torch)")
    p.add_argument("--scan-variant", default=None, help="Triton selective-scan variant (default: the kernels' default)")
    p.add_argument("--recompute-share", type=float, default=0.5, help="share of layers recomputed by explain_partial")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (median reported)")
    p.add_argument("--slow-repeats", type=int, default=1, help="timed runs for hf_forward and paper_ref")
    p.add_argument("--hf-max-seq", default="16k", help="longest T for hf_forward (a Python loop over T)")
    p.add_argument("--ref-max-seq", default="16k", help="longest T for paper_ref (a Python loop over T)")
    p.add_argument(
        "--last-logit-only",
        action="store_true",
        help="compute the LM head at the last position only (else the (T, vocab) logits are included)",
    )
    p.add_argument("--bandwidth-seq", default="16k", help="T of the kernel bandwidth measurement")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the kernel bandwidth measurement")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--name", default=None, help="output file stem (default gpu_scaling, or gpu_scaling_tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny model, short sequences, torch backend (CPU smoke test)")
    args = p.parse_args(argv)
    if args.tiny:
        args.models = "tiny"
        args.seq_lens = args.seq_lens or "32,64"
        args.backends = args.backends or "torch"
        args.repeats = min(args.repeats, 1)
        args.no_bandwidth = True
        args.name = args.name or "gpu_scaling_tiny"
    args.name = args.name or "gpu_scaling"
    args.seq_lens = args.seq_lens or "1k,4k,16k,64k,128k"
    args.backends = args.backends or "triton,torch"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    args.seq_list = sorted(parse_length(s) for s in args.seq_lens.split(",") if s.strip())
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.backend_list = [b.strip() for b in args.backends.split(",") if b.strip()]
    for m in args.model_list:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {sorted(MODELS)}")
    for m in args.method_list:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {METHODS}")
    return args


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: str) -> dict[str, Any]:
    """Machine description and library versions."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "mamba_ssm": _version("mamba_ssm"),
        "mambalrp": _version("mambalrp"),
        "git_commit": _git_commit(),
        "device": device,
    }
    if device.startswith("cuda"):
        prop = torch.cuda.get_device_properties(torch.device(device))
        info.update(
            gpu_name=prop.name,
            gpu_capability=f"{prop.major}.{prop.minor}",
            gpu_memory_bytes=prop.total_memory,
            gpu_multiprocessors=prop.multi_processor_count,
        )
    return info


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def measure(fn: Callable[[], Any], device: str, repeats: int) -> dict[str, Any]:
    """Run ``fn`` ``repeats`` times; median wall time and peak memory above the baseline.

    Returns:
        ``status`` (``"ok"``, ``"oom"`` or ``"error: ..."``), ``time_s`` (median), ``times_s``,
        ``peak_mem_bytes`` (``torch.cuda.max_memory_allocated`` after a reset; ``None`` on CPU)
        and ``peak_extra_bytes`` (the same minus what was allocated before the call: the
        weights and inputs).
    """
    _free(device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times: list[float] = []
    status = "ok"
    try:
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
            del out
    except Exception as err:  # noqa: BLE001 - recorded, the run goes on
        status = "oom" if _is_oom(err) else f"error: {type(err).__name__}: {err}"[:300]
    row: dict[str, Any] = {
        "status": status,
        "time_s": statistics.median(times) if times and status == "ok" else None,
        "times_s": times,
        "peak_mem_bytes": None,
        "peak_extra_bytes": None,
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        row.update(peak_mem_bytes=peak, peak_extra_bytes=peak - base)
    _free(device)
    return row


@contextlib.contextmanager
def paper_scans() -> Iterator[list[int]]:
    """Route every MambaLRP selective scan through the sequential reference with detached coefficients.

    Yields:
        A one-element list counting the scans that went through the reference.
    """
    module = importlib.import_module("mambalrp.functional.selective_scan")
    original = module.selective_scan_lrp
    calls = [0]

    def reference_scan(x, dt, A, B, C, D=None):
        calls[0] += 1
        return module.selective_scan_ref(x, dt, A, B, C, D, detach=True)

    module.selective_scan_lrp = reference_scan
    try:
        yield calls
    finally:
        module.selective_scan_lrp = original


def check_paper_ref(model, ids: torch.Tensor) -> dict[str, Any]:
    """The reference formulation must give the same relevance as ``explain`` (same rule)."""
    import mambalrp
    from mambalrp.functional import dispatch

    with dispatch.use_backend("torch"):
        fast = mambalrp.explain(model, ids).relevance
        with paper_scans() as calls:
            ref = mambalrp.explain(model, ids).relevance
    return {
        "seq_len": ids.shape[1],
        "reference_scan_calls": calls[0],
        "max_abs_diff": float((fast - ref).abs().max()),
        "max_abs_relevance": float(fast.abs().max()),
    }


class LastLogit(torch.nn.Module):
    """A causal LM whose output is the ``(batch, vocab)`` logits of the last position only."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def get_input_embeddings(self) -> torch.nn.Module:
        """The wrapped model's token embedding."""
        return self.lm.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Logits at the last position, ``(batch, vocab)``."""
        return self.lm(input_ids, logits_to_keep=1, **kwargs).logits[:, -1]


def build_model(name: str, dtype: torch.dtype, device: str, seed: int) -> torch.nn.Module:
    """A random-weight ``MambaForCausalLM`` with the shape of ``name`` (see ``MODELS``)."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    config = MambaConfig(**MODELS[name], use_cache=False)
    with torch.device(device):
        model = MambaForCausalLM(config)
    return model.to(dtype).eval()


def method_fn(
    method: str, model, wrapped, ids: torch.Tensor, backend: str | None, last_only: bool, share: float = 0.5
) -> Callable[[], Any]:
    """The callable measured for one method."""
    import mambalrp
    from mambalrp.functional import dispatch

    def project_forward():
        with dispatch.use_backend(backend), torch.no_grad(), mambalrp.lrp(model):
            if last_only:
                return model(ids, use_cache=False, logits_to_keep=1).logits
            return model(ids, use_cache=False).logits

    def hf_forward():
        with torch.no_grad():
            if last_only:
                return model(ids, use_cache=False, logits_to_keep=1).logits
            return model(ids, use_cache=False).logits

    def explain():
        with dispatch.use_backend(backend):
            return mambalrp.explain(wrapped, ids).relevance

    def explain_recompute():
        with dispatch.use_backend(backend):
            return mambalrp.explain(wrapped, ids, recompute=True).relevance

    def explain_partial():
        with dispatch.use_backend(backend):
            return mambalrp.explain(wrapped, ids, recompute=share).relevance

    def paper_ref():
        with dispatch.use_backend("torch"), paper_scans():
            return mambalrp.explain(wrapped, ids).relevance

    return {
        "forward": project_forward,
        "hf_forward": hf_forward,
        "explain": explain,
        "explain_recompute": explain_recompute,
        "explain_partial": explain_partial,
        "paper_ref": paper_ref,
    }[method]


def run_scaling(
    args: argparse.Namespace,
    log: Callable[[str], None],
    on_row: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All (model, method, backend, T) points, and the paper_ref consistency checks.

    ``on_row(rows)`` is called after every measured point (the benchmark saves partial results).
    """
    dtype = getattr(torch, args.dtype)
    hf_max, ref_max = parse_length(args.hf_max_seq), parse_length(args.ref_max_seq)
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(args.seed)
    for model_name in args.model_list:
        log(f"building {model_name} ({args.dtype}) on {args.device}")
        model = build_model(model_name, dtype, args.device, args.seed)
        wrapped = LastLogit(model) if args.last_logit_only else model
        vocab = MODELS[model_name]["vocab_size"]
        n_params = sum(p.numel() for p in model.parameters())
        warm_ids = torch.randint(0, vocab, (1, min(args.seq_list[0], 256)), generator=gen).to(args.device)
        for method in args.method_list:
            backends = args.backend_list if method in BACKEND_METHODS else [None]
            for backend in backends:
                limit = {"hf_forward": hf_max, "paper_ref": ref_max}.get(method)
                repeats = args.slow_repeats if method in ("hf_forward", "paper_ref") else args.repeats
                measure(method_fn(method, model, wrapped, warm_ids, backend, args.last_logit_only, args.recompute_share), args.device, 1)
                failed = None
                for T in args.seq_list:
                    row = {"model": model_name, "params": n_params, "method": method, "backend": backend, "seq_len": T}
                    if failed is not None:
                        row.update(status=f"skipped ({failed} at a shorter T)", time_s=None, peak_mem_bytes=None)
                    elif limit is not None and T > limit:
                        row.update(status="skipped (longer than the limit for this method)", time_s=None, peak_mem_bytes=None)
                    else:
                        ids = torch.randint(0, vocab, (1, T), generator=gen).to(args.device)
                        row.update(measure(method_fn(method, model, wrapped, ids, backend, args.last_logit_only, args.recompute_share), args.device, repeats))
                        del ids
                        if row["status"] != "ok":
                            failed = row["status"].split(":")[0]
                    rows.append(row)
                    log(_row_text(row))
                    on_row(rows)
        if "paper_ref" in args.method_list:
            check = {"model": model_name, **check_paper_ref(wrapped, warm_ids)}
            log(f"paper_ref vs explain at T={check['seq_len']}: {check['reference_scan_calls']} reference scans, "
                f"max |diff| {check['max_abs_diff']:.3g} (max |R| {check['max_abs_relevance']:.3g})")
            checks.append(check)
        del model, wrapped
        _free(args.device)
    return rows, checks


def _row_text(row: dict[str, Any]) -> str:
    t = f"{row['time_s']:.3f} s" if row.get("time_s") is not None else "-"
    m = f"{row['peak_mem_bytes'] / 2**30:.2f} GiB" if row.get("peak_mem_bytes") is not None else "-"
    return f"{row['model']:>5} {row['method']:<10} {str(row['backend']):<6} T={row['seq_len']:<7} {t:>11} {m:>11}  {row['status']}"


def cuda_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds per call over ``repeats`` CUDA-event timed calls after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(
    device: str, nbytes: int = 1 << 30, timer: Callable[[Callable[[], Any], int], float] = cuda_time
) -> float:
    """Read + write bytes per second of a device-to-device copy of ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src), 20)
    del src, dst
    _free(device)
    return 2 * nbytes / seconds


def kernel_bandwidth(
    args: argparse.Namespace,
    log: Callable[[str], None],
    timer: Callable[[Callable[[], Any], int], float] = cuda_time,
    copy_bytes: int = 1 << 30,
) -> dict[str, Any]:
    """Achieved bandwidth of the selective-scan kernels at one T vs a device-to-device copy.

    Each kernel's output is also compared with the torch implementation (``max_abs_diff``).
    ``timer(fn, repeats)`` returns seconds per call (CUDA events by default).
    """
    from mambalrp.functional import dispatch
    from mambalrp.functional.selective_scan import selective_scan_fwd_torch, selective_scan_lrp_bwd_torch

    kernels = dispatch.triton_kernels()
    if kernels is None or (timer is cuda_time and not args.device.startswith("cuda")):
        return {"status": "skipped (needs CUDA and the Triton kernels)"}
    T = parse_length(args.bandwidth_seq)
    peak = copy_bandwidth(args.device, copy_bytes, timer)
    out: dict[str, Any] = {"seq_len": T, "copy_bytes": copy_bytes, "copy_bandwidth_Bps": peak, "kernels": []}
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    for model_name in args.model_list:
        cfg = MODELS[model_name]
        b, d, n = 1, 2 * cfg["hidden_size"], cfg["state_size"]

        def rand(*shape):
            return torch.randn(*shape, generator=gen, device=args.device)

        x, g = rand(b, d, T), rand(b, d, T)
        dt = torch.nn.functional.softplus(rand(b, d, T) - 1.0)
        A = -torch.exp(rand(d, n) * 0.5)
        B, C, D = rand(b, n, T), rand(b, n, T), rand(d)
        # Each kernel reads (b, d, T) twice (x or g, and dt), B and C, A and D; it writes (b, d, T) once.
        moved = 4 * (3 * b * d * T + 2 * b * n * T + d * n + d)
        expected = {
            "selective_scan_lrp_bwd": selective_scan_lrp_bwd_torch(g, dt, A, B, C, D),
            "selective_scan_fwd": selective_scan_fwd_torch(x, dt, A, B, C, D),
        }
        runs = []
        for variant in ("chunked", "sequential"):
            runs.append((
                "selective_scan_lrp_bwd", variant,
                lambda v=variant: kernels.selective_scan_lrp_bwd(g, dt, A, B, C, D, variant=v),
            ))
            runs.append((
                "selective_scan_fwd", variant,
                lambda v=variant: kernels.selective_scan_fwd(x, dt, A, B, C, D, variant=v),
            ))
        for name, variant, fn in runs:
            diff = float((fn() - expected[name]).abs().max())
            seconds = timer(fn, 10)
            entry = {
                "kernel": name,
                "variant": variant,
                "model_shape": model_name,
                "batch": b,
                "d_inner": d,
                "d_state": n,
                "bytes": moved,
                "time_s": seconds,
                "bandwidth_Bps": moved / seconds,
                "fraction_of_copy": moved / seconds / peak,
                "max_abs_diff_vs_torch": diff,
            }
            out["kernels"].append(entry)
            log(f"{name} ({variant}) {model_name} T={T}: {seconds * 1e3:.2f} ms, {moved / seconds / 1e9:.1f} GB/s "
                f"({100 * entry['fraction_of_copy']:.1f}% of copy {peak / 1e9:.0f} GB/s), max |diff| vs torch {diff:.2e}")
        del x, g, dt, A, B, C, D, expected
        _free(args.device)
    return out


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    """Tables of the scaling rows and the bandwidth measurement."""
    env = report["environment"]
    lines = [
        "# MambaLRP scaling with sequence length",
        "",
        f"Device: {env.get('gpu_name', env['device'])}; torch {env['torch']}, transformers {env['transformers']}, "
        f"triton {env['triton']}; weights {report['args']['dtype']}; batch 1; seed {report['seed']}; "
        f"LM head {'last position only' if report['args']['last_logit_only'] else 'all positions'}.",
        "",
        "| model | method | backend | T | time (s) | peak memory (GiB) | status |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        t = f"{r['time_s']:.3f}" if r.get("time_s") is not None else ""
        m = f"{r['peak_mem_bytes'] / 2**30:.2f}" if r.get("peak_mem_bytes") is not None else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['backend'] or ''} | {r['seq_len']} | {t} | {m} | {r['status']} |")
    bw = report.get("bandwidth") or {}
    if bw.get("kernels"):
        lines += [
            "",
            f"## Selective-scan kernel bandwidth at T = {bw['seq_len']}",
            "",
            f"Device-to-device copy: {bw['copy_bandwidth_Bps'] / 1e9:.0f} GB/s (read + write of {bw['copy_bytes'] / 2**20:.0f} MiB).",
            "",
            "| kernel | variant | shape | d_inner | time (ms) | GB/s | fraction of copy | max abs diff vs torch |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for k in bw["kernels"]:
            lines.append(
                f"| {k['kernel']} | {k['variant']} | {k['model_shape']} | {k['d_inner']} | {k['time_s'] * 1e3:.2f} | "
                f"{k['bandwidth_Bps'] / 1e9:.1f} | {k['fraction_of_copy']:.2f} | {k['max_abs_diff_vs_torch']:.2e} |"
            )
    elif bw:
        lines += ["", f"Kernel bandwidth: {bw.get('status')}"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path, log: Callable[[str], None]) -> bool:
    """Time and peak memory against T, log-log; returns False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: skipping the plot")
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[tuple[str, str, str | None], list[dict[str, Any]]] = {}
    for r in report["results"]:
        series.setdefault((r["model"], r["method"], r["backend"]), []).append(r)
    for (model, method, backend), rs in series.items():
        ok = [r for r in rs if r["status"] == "ok"]
        if not ok:
            continue
        label = f"{model} {method}" + (f" ({backend})" if backend else "")
        style = "-" if model == report["args"]["model_list"][0] else "--"
        ax_t.plot([r["seq_len"] for r in ok], [r["time_s"] for r in ok], style, marker="o", label=label)
        mem = [r for r in ok if r.get("peak_mem_bytes") is not None]
        if mem:
            ax_m.plot([r["seq_len"] for r in mem], [r["peak_mem_bytes"] / 2**30 for r in mem], style, marker="o", label=label)
    axes = [(ax_t, "time (s)")]
    if ax_m.lines:
        axes.append((ax_m, "peak GPU memory (GiB)"))
    else:
        ax_m.text(0.5, 0.5, "peak GPU memory is measured on CUDA only", ha="center", va="center", transform=ax_m.transAxes)
        ax_m.set_axis_off()
    for ax, ylabel in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle("MambaLRP: time and memory vs sequence length (batch 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write JSON, markdown and (if possible) a PNG plot."""
    args = parse_args(argv)
    if "triton" in args.backend_list and not args.device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        print("note: the triton backend needs CUDA (or TRITON_INTERPRET=1); dropping it", file=sys.stderr)
        args.backend_list = [b for b in args.backend_list if b != "triton"]

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.scan_variant is not None:
        from mambalrp.kernels import selective_scan as scan_kernels

        scan_kernels.DEFAULT_VARIANT = args.scan_variant
    torch.manual_seed(args.seed)
    report: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": args.seed,
        "args": {k: v for k, v in vars(args).items()},
        "environment": environment(args.device),
    }
    try:
        from transformers.models.mamba import modeling_mamba

        report["environment"]["hf_fast_path"] = bool(getattr(modeling_mamba, "is_fast_path_available", False))
    except ImportError:
        pass
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out_dir / f"{args.name}{ext}" for ext in (".json", ".md", ".png"))

    def save_partial(rows: list[dict[str, Any]]) -> None:
        json_path.write_text(json.dumps({**report, "results": rows, "partial": True}, indent=2, default=str) + "\n")

    t0 = time.perf_counter()
    report["results"], report["paper_ref_checks"] = run_scaling(args, log, save_partial)
    report["bandwidth"] = None if args.no_bandwidth else kernel_bandwidth(args, log)
    report["total_time_s"] = time.perf_counter() - t0

    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(markdown(report))
    written = [json_path, md_path]
    if not args.no_plot and plot(report, png_path, log):
        written.append(png_path)
    log("wrote " + ", ".join(str(p) for p in written))
    return 0 if all(math.isfinite(r["time_s"]) for r in report["results"] if r.get("time_s") is not None) else 1


if __name__ == "__main__":
    raise SystemExit(main())
