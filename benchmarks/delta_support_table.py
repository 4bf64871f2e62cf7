"""The measured columns of docs/support.md for the gated delta-rule and short-convolution families:
on each tiny random test model (``tests/delta_models.py``; float32, CPU, batch 2, 8 tokens, biases
zeroed), the largest forward difference under ``lrp()``, and the relative conservation error
under the default rules (AttnLRP), with CP attention, and of Gradient x Input.

    python -m benchmarks.delta_support_table

Prints a markdown table; writes nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import torch

    import mambalrp
    from delta_models import DELTA_MODELS, make

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    cp = mambalrp.MAMBALRP.with_attention("cp")
    print("| family | max abs forward diff under `lrp()` (logit scale) | default rules (AttnLRP) | with `with_attention(\"cp\")` | Gradient x Input |")
    print("|---|---|---|---|---|")
    for family in DELTA_MODELS:
        model = make(family, zero_biases=True)
        with torch.no_grad():
            ref = model(ids, use_cache=False).logits
            with mambalrp.lrp(model):
                diff = (model(ids, use_cache=False).logits - ref).abs().max().item()
        errors = []
        for rules in ("mambalrp", cp, "gradient"):
            exp = mambalrp.explain(model, ids, rules=rules)
            errors.append((exp.conservation_delta.abs() / exp.logit.abs()).max().item())
        scale = ref.abs().max().item()
        print(f"| {family} | {diff:.1e} ({scale:.1f}) | {errors[0]:.1e} | {errors[1]:.1e} | {errors[2]:.2f} |")


if __name__ == "__main__":
    main()
