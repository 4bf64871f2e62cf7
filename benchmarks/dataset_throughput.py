"""Examples per second of ``explain_dataset``: a single-process loop against Ray with 2 workers.

    python -m benchmarks.dataset_throughput             # 1,000 sentences (a few minutes on 2 cores)
    python -m benchmarks.dataset_throughput --quick     # 100 sentences

The model is the zoo's ``sst-mamba1`` classifier. The sentences are built deterministically from
the words of its tokenizer's vocabulary (4 to 24 words each; no corpus ships with the package),
so every run explains the same 1,000 texts.

Methods, on the same texts, batch size and rules:
    loop, 1 thread    ``explain_table`` (the workers' own code) in this process, torch on 1 thread
    loop, 2 threads   the same with 2 torch threads
    ray, 2 workers    ``mambalrp.explain_dataset`` on a local Ray with 2 CPUs: 2 actors, 1 CPU each,
                      writing Parquet shards; timed from the call to the last shard (actor start,
                      model loading and the first verification included), and as the rows over
                      the busiest worker's time inside its shards (start-up excluded)

Each worker's peak RSS is the ``ru_maxrss`` the worker reports with every shard. The load average
of the machine is recorded before and after: on a shared machine the numbers move with it.

Writes ``benchmarks/results/dataset_throughput[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import tempfile
import time
from typing import Any

from benchmarks.common import machine_info, write_json, write_text

MODEL = "sst-mamba1"
SEED = 0
BATCH_SIZE = 16


def sentences(n: int, seed: int = SEED) -> list[str]:
    """``n`` sentences of 4 to 24 words drawn from the zoo tokenizer's whole-word tokens."""
    from mambalrp.models.zoo import load_model

    _, tok = load_model(MODEL)
    words = sorted(
        t[1:] for t in tok.get_vocab() if t.startswith("\u0120") and t[1:].isalpha() and t[1:].islower() and len(t) > 3
    )
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(4, 24)
        out.append(" ".join(rng.choice(words) for _ in range(k)) + " .")
    return out


def _loop(texts: list[str], threads: int) -> dict[str, Any]:
    import pyarrow as pa
    import torch

    from mambalrp.dataset_rows import RowOptions, explain_table
    from mambalrp.models.zoo import load_model

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        model, tok = load_model(MODEL)
        loaded = time.perf_counter()
        out = explain_table(model, tok, pa.table({"text": texts}), RowOptions(batch_size=BATCH_SIZE))
        end = time.perf_counter()
    finally:
        torch.set_num_threads(before)
    assert out.column("error").null_count == len(texts)
    return {
        "seconds": end - start,
        "seconds_explaining": end - loaded,
        "examples_per_s": len(texts) / (end - start),
        "examples_per_s_explaining": len(texts) / (end - loaded),
    }


def _ray(texts: list[str], workers: int) -> dict[str, Any]:
    import ray

    import mambalrp

    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    shards: list[tuple[float, dict[str, Any]]] = []
    try:
        with tempfile.TemporaryDirectory() as out:
            call = time.perf_counter()
            mambalrp.explain_dataset(
                MODEL, texts, output=out, batch_size=BATCH_SIZE, workers=workers,
                progress=lambda s: shards.append((time.perf_counter(), s)),
            )
            end = time.perf_counter()
    finally:
        ray.shutdown()
    per_worker: dict[int, dict[str, Any]] = {}
    for _, s in shards:
        w = per_worker.setdefault(int(s["worker_pid"]), {"shards": 0, "rows": 0, "busy_s": 0.0, "peak_rss_mb": 0.0})
        w["shards"] += 1
        w["rows"] += int(s["rows"])
        w["busy_s"] += float(s["seconds"])
        w["peak_rss_mb"] = max(w["peak_rss_mb"], float(s["peak_rss_mb"]))
    assert sum(w["rows"] for w in per_worker.values()) == len(texts)
    busiest = max(w["busy_s"] for w in per_worker.values())
    return {
        "ray_init_s": started - start,
        "seconds": end - call,
        "examples_per_s": len(texts) / (end - call),
        # as if start-up were free: the rows over the busiest worker's time inside its shards
        "busy_examples_per_s": len(texts) / busiest,
        "first_shard_after_s": shards[0][0] - call,
        "shards": len(shards),
        "workers": list(per_worker.values()),
    }


def markdown(result: dict[str, Any]) -> str:
    n, m = result["examples"], result["machine"]
    loop1, loop2, ray = result["loop_1_thread"], result["loop_2_threads"], result["ray_2_workers"]
    lines = [
        "# explain_dataset throughput (`benchmarks/dataset_throughput.py`)",
        "",
        f"{n} sentences (4 to 24 words from the `{MODEL}` vocabulary), `{MODEL}`, batch size {BATCH_SIZE}, "
        f"MambaLRP rules, verification on; {m.get('cpu_count')} cores ({m.get('cpu_model')}), torch {m.get('torch')}. "
        f"Load average before / after: {result['load_before'][0]:.1f} / {result['load_after'][0]:.1f} "
        "(a shared machine: the numbers move with its load).",
        "",
        "| run | examples/s | seconds | note |",
        "|---|---|---|---|",
        f"| loop, 1 thread | {loop1['examples_per_s']:.1f} | {loop1['seconds']:.1f} | "
        f"model loading included; {loop1['examples_per_s_explaining']:.1f}/s explaining alone |",
        f"| loop, 2 threads | {loop2['examples_per_s']:.1f} | {loop2['seconds']:.1f} | "
        f"{loop2['examples_per_s_explaining']:.1f}/s explaining alone |",
        f"| Ray, 2 workers | {ray['examples_per_s']:.1f} | {ray['seconds']:.1f} | actor start, model loading, verification "
        f"and Parquet writes included; Ray start ({ray['ray_init_s']:.1f} s) not |",
        f"| Ray, 2 workers, inside the shards | {ray['busy_examples_per_s']:.1f} | | rows over the busiest worker's time "
        "in its shards (start-up excluded) |",
        "",
        f"The first shard was reported {ray['first_shard_after_s']:.1f} s after the call (actor start, imports, model "
        "loading, first verification).",
        "",
        "| Ray worker | shards | rows | seconds in shards | peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    for i, w in enumerate(ray["workers"]):
        lines.append(f"| {i} | {w['shards']} | {w['rows']} | {w['busy_s']:.1f} | {w['peak_rss_mb']:.0f} |")
    lines += ["", f"Single process peak RSS: {result['loop_peak_rss_mb']:.0f} MB (both loops, one process).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 sentences")
    parser.add_argument("-n", type=int, default=None, help="number of sentences (default 1000, 100 with --quick)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    n = args.n or (100 if args.quick else 1000)
    texts = sentences(n)
    result: dict[str, Any] = {"examples": n, "model": MODEL, "batch_size": BATCH_SIZE, "seed": SEED,
                              "machine": machine_info(), "load_before": list(os.getloadavg())}
    result["loop_1_thread"] = _loop(texts, 1)
    result["loop_2_threads"] = _loop(texts, 2)
    result["loop_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result["ray_2_workers"] = _ray(texts, 2)
    result["load_after"] = list(os.getloadavg())
    name = "dataset_throughput" + ("_quick" if args.quick else "")
    write_json(name, result)
    write_text(f"{name}.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
