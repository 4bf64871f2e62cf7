"""Run the faithfulness and conservation suite and write its results.

Usage::

    python -m benchmarks.suite            # full run: every zoo classifier, results/faithfulness.*
    python -m benchmarks.suite --quick    # smoke run: one retrieval task, few examples, *_quick.*

Writes into ``benchmarks/results/`` (or ``--out``): ``faithfulness[_quick].json`` (machine,
versions, seeds, configuration, per-method statistics and per-example areas),
``faithfulness[_quick].md`` (tables), ``faithfulness[_quick]_curves_<task>.png`` (mean flipping
curves) and ``faithfulness[_quick]_conservation.png`` (sum of relevance against the logit).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import mambalrp
from benchmarks.common import RESULTS, machine_info
from benchmarks.faithfulness import methods as M
from benchmarks.faithfulness import metrics
from benchmarks.faithfulness.tasks import Task, load_task, task_names
from mambalrp.progress import ENV_VAR as PROGRESS_ENV
from mambalrp.progress import progress_bar, progress_enabled
from mambalrp.rules import GRADIENT, LN_ONLY, MAMBALRP
from mambalrp.testing import zero_biases

#: Rule sets whose conservation is measured (the scatter plot shows the first two).
CONSERVATION_RULES = {
    "mambalrp": MAMBALRP, "gradient": GRADIENT, "ln-only": LN_ONLY,
    **{f"mambalrp-no-{c}": MAMBALRP.without(c) for c in ("silu", "gate", "norm", "ssm")},
}
AREAS = ("A_MoRF", "A_LeRF", "dA_F", "A_ins_MoRF", "A_ins_LeRF", "dA_I")
#: Methods drawn in the curve plots (ablations are in the tables only).
PLOTTED = ("random", "saliency", "gradient_x_input", "smoothgrad_x_input", "integrated_gradients", "occlusion",
           "attn_rollout", "grad_x_attn_rollout", "lrp_ln_rule", "mambalrp", "mambalrp_no_ssm")


def _progress(msg: str) -> None:
    """A status line on standard error, when progress output is on (see :mod:`mambalrp.progress`)."""
    if progress_enabled():
        print(msg, file=sys.stderr, flush=True)


def run_task(task: Task, methods: dict[str, M.Method], batch_size: int, steps: int) -> dict[str, Any]:
    """Explain every example of ``task`` with every method and score the explanations.

    Args:
        task: Model and inputs.
        methods: ``{name: method}``.
        batch_size: Examples per batch (equal length, no padding).
        steps: Fraction steps ``K`` of the flipping curves.

    Returns:
        Per-method statistics, mean curves, per-example areas and conservation data.
    """
    model = task.model
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    bias_free = zero_biases(copy.deepcopy(model)).eval()
    n_total = len(task.examples)
    per_example: dict[str, dict[str, list[float]]] = {m: {a: [0.0] * n_total for a in AREAS} for m in methods}
    curves_sum = {m: {c: torch.zeros(steps + 1, dtype=torch.float64) for c in ("morf", "lerf", "ins_morf", "ins_lerf")}
                  for m in methods}
    seconds = {m: 0.0 for m in methods}
    hits: dict[str, dict[str, list[bool]]] = {m: {"top1": [], "top3": []} for m in methods}
    role_names = list(task.roles[0]) if task.roles else []
    ranks: dict[str, dict[str, list[float]]] = {m: {r: [] for r in role_names} for m in methods}
    cons: dict[str, dict[str, list[float]]] = {
        f"{setting}/{rules}": {"sum": [], "logit": []}
        for setting in ("as_trained", "biases_zeroed") for rules in CONSERVATION_RULES
    }
    bar = progress_bar(total=n_total, desc=task.name, unit="example")
    try:
        for chunk, ids, evidence in task.batches(batch_size):
            with torch.no_grad():
                target = model(ids).argmax(-1)
            for name, method in methods.items():
                t0 = time.perf_counter()
                scores = method(model, ids, target).detach().float()
                seconds[name] += time.perf_counter() - t0
                curves = metrics.flipping_curves(model, ids, target, scores, task.neutral_id, steps)
                for key, values in curves.areas().items():
                    for i, v in zip(chunk, values.tolist()):
                        per_example[name][key][i] = v
                for c in curves_sum[name]:
                    curves_sum[name][c] += getattr(curves, c).double().sum(0)
                if evidence is not None:
                    for k, v in metrics.hit_rates(scores, evidence).items():
                        hits[name][k].extend(v.tolist())
                for role in role_names:
                    pos = torch.tensor([task.roles[i][role] for i in chunk])
                    ranks[name][role].extend(metrics.position_ranks(scores, pos).tolist())
            for setting, net in (("as_trained", model), ("biases_zeroed", bias_free)):
                for rules, rule_set in CONSERVATION_RULES.items():
                    e = mambalrp.explain(net, ids, target, rules=rule_set)
                    cons[f"{setting}/{rules}"]["sum"].extend(e.relevance.sum(-1).tolist())
                    cons[f"{setting}/{rules}"]["logit"].extend(e.logit.tolist())
            bar.set_postfix(T=ids.shape[1], refresh=False)
            bar.update(len(chunk))
    finally:
        bar.close()
        for p, flag in flags:
            p.requires_grad_(flag)

    stats: dict[str, dict[str, float]] = {}
    ref = per_example.get("mambalrp", {}).get("dA_F")
    for name in methods:
        row: dict[str, float] = {}
        for key in AREAS:
            v = torch.tensor(per_example[name][key], dtype=torch.float64)
            row[key] = float(v.mean())
            row[f"{key}_sem"] = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0
        row["seconds_per_explanation"] = seconds[name] / n_total
        if ref is not None and name != "mambalrp":
            a = torch.tensor(ref, dtype=torch.float64)
            b = torch.tensor(per_example[name]["dA_F"], dtype=torch.float64)
            row["mambalrp_dA_F_better_fraction"] = float((a > b).double().mean())
            row["mambalrp_minus_this_dA_F"] = float((a - b).mean())
            row["mambalrp_minus_this_dA_F_sem"] = float((a - b).std() / math.sqrt(len(a))) if len(a) > 1 else 0.0
        for k, v in hits[name].items():
            if v:
                row[f"hit_{k}"] = float(torch.tensor(v, dtype=torch.float64).mean())
        for role, v in ranks[name].items():
            row[f"rank_{role}"] = float(torch.tensor(v, dtype=torch.float64).mean())
        stats[name] = row
    conservation = {k: metrics.conservation_stats(torch.tensor(v["sum"]), torch.tensor(v["logit"]))
                    for k, v in cons.items()}
    return {
        "info": task.info,
        "n_examples": n_total,
        "neutral_id": task.neutral_id,
        "stats": stats,
        "mean_curves": {m: {c: (v / n_total).tolist() for c, v in cs.items()} for m, cs in curves_sum.items()},
        "lengths": [int(ids.numel()) for ids, _ in task.examples],
        "per_example": {m: {k: [round(x, 5) for x in per_example[m][k]] for k in ("dA_F", "dA_I")} for m in methods},
        "conservation": conservation,
        "conservation_points": {k: {kk: [round(x, 6) for x in vv] for kk, vv in v.items()}
                                for k, v in cons.items() if k.split("/")[1] in ("mambalrp", "gradient")},
    }


# ----------------------------------------------------------------------------------------------
# reporting


def markdown(results: dict[str, Any]) -> str:
    """Tables of a results payload."""
    tasks = list(results["tasks"])
    methods = list(next(iter(results["tasks"].values()))["stats"]) if tasks else []
    lines = [f"# Faithfulness and conservation ({'quick' if results['config']['quick'] else 'full'} run)", ""]
    lines.append("Examples per task: " + ", ".join(f"{t} {results['tasks'][t]['n_examples']}" for t in tasks) + ".")
    lines.append("Mean over examples, ± standard error. Removal = replacement by the padding token (flipping) / "
                 "deletion (insertion). Higher dA is better.")
    lines.append("")
    for metric in ("dA_F", "dA_I"):
        lines.append(f"## {metric}")
        lines.append("")
        lines.append("| method | " + " | ".join(tasks) + " |")
        lines.append("|---|" + "---|" * len(tasks))
        for m in methods:
            cells = []
            for t in tasks:
                s = results["tasks"][t]["stats"][m]
                best = max(results["tasks"][t]["stats"][k][metric] for k in methods)
                cell = f"{s[metric]:.3f} ± {s[metric + '_sem']:.3f}"
                cells.append(f"**{cell}**" if s[metric] == best else cell)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("## Curve areas A_MoRF / A_LeRF")
    lines.append("")
    lines.append("| method | " + " | ".join(tasks) + " |")
    lines.append("|---|" + "---|" * len(tasks))
    for m in methods:
        cells = [f"{results['tasks'][t]['stats'][m]['A_MoRF']:.3f} / {results['tasks'][t]['stats'][m]['A_LeRF']:.3f}"
                 for t in tasks]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("## Paired comparison: mean of (MambaLRP dA_F - method dA_F) over the same examples ± standard "
                 "error, and the fraction of examples where MambaLRP's dA_F is higher")
    lines.append("")
    lines.append("| method | " + " | ".join(tasks) + " |")
    lines.append("|---|" + "---|" * len(tasks))
    for m in methods:
        if m == "mambalrp":
            continue
        cells = []
        for t in tasks:
            s = results["tasks"][t]["stats"][m]
            cells.append(f"{s['mambalrp_minus_this_dA_F']:+.3f} ± {s['mambalrp_minus_this_dA_F_sem']:.3f} "
                         f"({s['mambalrp_dA_F_better_fraction']:.0%})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    kv = [t for t in tasks if "hit_top1" in results["tasks"][t]["stats"][methods[0]]]
    if kv:
        lines.append("## Ground truth on key-value retrieval: evidence (queried value token) at top-1 / in top-3")
        lines.append("")
        lines.append("| method | " + " | ".join(kv) + " |")
        lines.append("|---|" + "---|" * len(kv))
        for m in methods:
            cells = [f"{results['tasks'][t]['stats'][m]['hit_top1']:.2f} / {results['tasks'][t]['stats'][m]['hit_top3']:.2f}"
                     for t in kv]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    if kv:
        roles = [k[5:] for k in results["tasks"][kv[0]]["stats"][methods[0]] if k.startswith("rank_")]
        lines.append("## Mean relevance rank (1 = most relevant) of token roles on key-value retrieval")
        lines.append("")
        lines.append("Roles: queried value, its key in the pair, the key in the query, the final `?`.")
        lines.append("")
        lines.append("| method | " + " | ".join(f"{t}: {' / '.join(roles)}" for t in kv) + " |")
        lines.append("|---|" + "---|" * len(kv))
        for m in methods:
            cells = [" / ".join(f"{results['tasks'][t]['stats'][m]['rank_' + r]:.1f}" for r in roles) for t in kv]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("## Seconds per explanation (batched, this machine)")
    lines.append("")
    lines.append("| method | " + " | ".join(tasks) + " |")
    lines.append("|---|" + "---|" * len(tasks))
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{results['tasks'][t]['stats'][m]['seconds_per_explanation']:.4f}"
                                            for t in tasks) + " |")
    lines.append("")
    lines.append("## Conservation: |logit - sum of relevance|, relative = divided by |logit|")
    lines.append("")
    lines.append("| task | model | rules | median abs | max abs | median rel | max rel |")
    lines.append("|---|---|---|---|---|---|---|")
    for t in tasks:
        for key, c in results["tasks"][t]["conservation"].items():
            setting, rules = key.split("/")
            lines.append(f"| {t} | {setting.replace('_', ' ')} | {rules} | {c['abs_median']:.2e} | {c['abs_max']:.2e} | "
                         f"{c['rel_median']:.2e} | {c['rel_max']:.2e} |")
    lines.append("")
    return "\n".join(lines)


def plot_curves(task: str, result: dict[str, Any], path: Path) -> None:
    """Mean MoRF and LeRF curves of one task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for m, cs in result["mean_curves"].items():
        if m not in PLOTTED:
            continue
        style = dict(lw=2.2, color="crimson") if m == "mambalrp" else dict(lw=1)
        if m == "random":
            style = dict(lw=1, color="gray", ls="--")
        for ax, c in zip(axes, ("morf", "lerf")):
            x = torch.linspace(0, 1, len(cs[c]))
            ax.plot(x, cs[c], label=m, **style)
    axes[0].set_title(f"{task}: MoRF (lower is better)")
    axes[1].set_title("LeRF (higher is better)")
    for ax in axes:
        ax.set_xlabel("fraction of tokens replaced")
    axes[0].set_ylabel("logit of explained class")
    axes[1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_conservation(results: dict[str, Any], path: Path) -> None:
    """Scatter of sum of relevance against the logit, MambaLRP vs Gradient x Input, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(len(tasks), 2, figsize=(7, 3.2 * len(tasks)), squeeze=False)
    for row, t in enumerate(tasks):
        pts = results["tasks"][t]["conservation_points"]
        for col, setting in enumerate(("as_trained", "biases_zeroed")):
            ax = axes[row][col]
            allv = []
            for rules, color in (("gradient", "tab:blue"), ("mambalrp", "crimson")):
                p = pts[f"{setting}/{rules}"]
                ax.scatter(p["logit"], p["sum"], s=6, alpha=0.6, color=color,
                           label="Gradient x Input" if rules == "gradient" else "MambaLRP")
                allv += p["logit"] + p["sum"]
            lo, hi = min(allv), max(allv)
            ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
            ax.set_title(f"{t}, {setting.replace('_', ' ')}", fontsize=9)
            ax.set_xlabel("explained logit")
            ax.set_ylabel("sum of relevance")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _commit() -> str | None:
    """HEAD of the repository, with ``-dirty`` if tracked files other than results differ."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], capture_output=True, text=True, check=True,
                               cwd=root).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _task_job(job: tuple[str, int | None, int, argparse.Namespace]) -> dict[str, Any]:
    name, n_sst, n_kv, args = job
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    task = load_task(name, n_sst, n_kv)
    methods = M.build_methods(task.neutral_id, seed=args.seed, quick=args.quick)
    _progress(f"task {name}: {len(task.examples)} examples x {len(methods)} methods (loaded in "
              f"{time.perf_counter() - t0:.0f}s)")
    result = run_task(task, methods, args.batch_size, args.steps)
    result["seconds"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the results payload."""
    parser = argparse.ArgumentParser(description="MambaLRP faithfulness and conservation suite")
    parser.add_argument("--quick", action="store_true", help="smoke run: one retrieval task, few examples")
    parser.add_argument("--tasks", nargs="*", default=None,
                        help="task names (zoo models kv-*/sst-*, or kv-tiny); default: all zoo classifiers")
    parser.add_argument("--n-sst", type=int, default=None, help="sentences per sentiment task: the first N of the held-out test split (default 200; 0 = all 800)")
    parser.add_argument("--n-kv", type=int, default=None, help="examples per retrieval task (default 300)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="fraction steps K of the flipping curves")
    parser.add_argument("--seed", type=int, default=0, help="seed of random scores and SmoothGrad noise")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per task")
    parser.add_argument("--jobs", type=int, default=2, help="tasks run in parallel processes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars or status lines (also MAMBALRP_PROGRESS=0; they are off when "
                             "standard error is not a terminal)")
    parser.add_argument("--update", action="store_true",
                        help="keep the other tasks of an existing results file in --out (each task records "
                             "the configuration and commit it ran with)")
    args = parser.parse_args(argv)
    if args.no_progress:
        os.environ[PROGRESS_ENV] = "0"  # inherited by the task processes

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    n_kv = args.n_kv or (32 if args.quick else 300)
    n_sst = args.n_sst if args.n_sst is not None else (32 if args.quick else 200)
    n_sst = n_sst or None
    t0 = time.perf_counter()
    commit = _commit()  # read before anything runs: the tree may change during a long run
    names = task_names(args.quick, args.tasks)
    _progress(f"tasks: {names}")
    results: dict[str, Any] = {
        "machine": machine_info(),
        "mambalrp": getattr(mambalrp, "__version__", None),
        "config": {
            "quick": args.quick, "batch_size": args.batch_size, "steps": args.steps, "seed": args.seed,
            "threads": args.threads, "jobs": args.jobs, "n_kv": n_kv, "n_sst": n_sst,
            "smoothgrad": {"samples": 4 if args.quick else M.SMOOTHGRAD_SAMPLES, "sigma_fraction_of_range": M.SMOOTHGRAD_SIGMA},
            "integrated_gradients": {"steps": 8 if args.quick else M.IG_STEPS, "baseline": "zero embedding"},
            "removal": "replace by the padding token (flipping); delete (insertion)",
            "target": "predicted class logit",
        },
        "tasks": {},
    }
    jobs = [(name, n_sst, n_kv, args) for name in names]
    if args.jobs > 1 and len(names) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(names))) as pool:
            done = pool.map(_task_job, jobs)
    else:
        done = [_task_job(job) for job in jobs]
    stem = "faithfulness_quick" if args.quick else "faithfulness"
    out = Path(args.out)
    previous = out / f"{stem}.json"
    if args.update and previous.is_file():
        old = json.loads(previous.read_text(encoding="utf-8"))
        results["tasks"].update({k: v for k, v in old["tasks"].items() if k not in names})
    for name, result in zip(names, done):
        result["config"] = dict(results["config"])
        result["commit"] = commit
        results["tasks"][name] = result
    results["tasks"] = dict(sorted(results["tasks"].items()))
    results["total_seconds"] = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    from benchmarks.faithfulness.analysis import analyse

    report = markdown(results) + "\n## Per-example analysis (paired dA_F differences by input length)\n\n" + analyse(results)
    (out / f"{stem}.md").write_text(report, encoding="utf-8")
    if not args.no_plots:
        for name, result in results["tasks"].items():
            plot_curves(name, result, out / f"{stem}_curves_{name}.png")
        plot_conservation(results, out / f"{stem}_conservation.png")
    _progress(f"done in {results['total_seconds']:.0f}s; wrote {out / stem}.*")
    return results


if __name__ == "__main__":
    main()
