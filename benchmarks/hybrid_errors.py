"""The measured errors of the support table (docs/support.md): tiny random hybrid test models,
float32, CPU, batch 2, 8 tokens, biases zeroed (seconds per family).

    python -m benchmarks.hybrid_errors [family ...]

Per family: the largest forward difference under ``lrp()`` (and the logit scale), the relative
conservation error of ``explain`` under the default rules (AttnLRP on attention), under CP
attention, and under Gradient x Input. Prints one markdown row per family.
"""

from __future__ import annotations

import sys


def main(families: list[str]) -> None:
    import torch

    sys.path.insert(0, "tests")
    import mambalrp
    from hybrid_models import HYBRIDS, make

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    cp = mambalrp.MAMBALRP.with_attention("cp")
    print("| family | max abs forward diff under `lrp()` (logit scale) | default rules (AttnLRP) | CP | Gradient x Input |")
    print("|---|---|---|---|---|")
    for family in families or sorted(HYBRIDS):
        model = make(family, zero_biases=True)
        with torch.no_grad():
            own = model(ids, use_cache=False).logits
            with mambalrp.lrp(model):
                patched = model(ids, use_cache=False).logits
        errors = []
        for rules in ("mambalrp", cp, "gradient"):
            exp = mambalrp.explain(model, ids, rules=rules)
            errors.append((exp.conservation_delta.abs() / exp.logit.abs()).max().item())
        diff = (patched - own).abs().max().item()
        print(f"| {family} | {diff:.1e} ({own.abs().max().item():.2g}) | {errors[0]:.1e} | {errors[1]:.1e} | {errors[2]:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
