"""Per-example analysis of a results file: where does MambaLRP win or lose, and by how much.

Usage::

    python -m benchmarks.faithfulness.analysis [benchmarks/results/faithfulness.json]

Prints, per task, the paired dA_F difference between MambaLRP and a few reference methods split
by input length (terciles), and the rank correlation between the methods' per-example dA_F.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from benchmarks.common import RESULTS

REFERENCES = ("gradient_x_input", "occlusion", "lrp_ln_rule", "mambalrp_no_ssm", "grad_x_attn_rollout")


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def analyse(results: dict) -> str:
    """Markdown report of the per-example analysis."""
    lines = []
    for task, r in results["tasks"].items():
        per = r["per_example"]
        if "mambalrp" not in per:
            continue
        ref = torch.tensor(per["mambalrp"]["dA_F"], dtype=torch.float64)
        lengths = torch.tensor(r.get("lengths") or [0] * len(ref))
        lines.append(f"### {task}")
        lines.append("")
        cuts = torch.quantile(lengths.double(), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)).tolist()
        groups = {"all": torch.ones_like(ref, dtype=torch.bool)}
        if lengths.unique().numel() > 2:
            groups.update({f"T<={cuts[0]:.0f}": lengths <= cuts[0],
                           f"{cuts[0]:.0f}<T<={cuts[1]:.0f}": (lengths > cuts[0]) & (lengths <= cuts[1]),
                           f"T>{cuts[1]:.0f}": lengths > cuts[1]})
        lines.append("| MambaLRP dA_F minus | " + " | ".join(f"{g} (n={int(m.sum())})" for g, m in groups.items())
                     + " | Spearman rho |")
        lines.append("|---|" + "---|" * (len(groups) + 1))
        for name in REFERENCES:
            if name not in per:
                continue
            other = torch.tensor(per[name]["dA_F"], dtype=torch.float64)
            cells = []
            for m in groups.values():
                d = (ref - other)[m]
                sem = float(d.std() / d.numel() ** 0.5) if d.numel() > 1 else 0.0
                cells.append(f"{float(d.mean()):+.2f} ± {sem:.2f}")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_spearman(ref, other):.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the analysis of a results file."""
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else RESULTS / "faithfulness.json"
    print(analyse(json.loads(path.read_text(encoding="utf-8"))))


if __name__ == "__main__":
    main()
