"""Half precision: how far the forward under the rules and the conservation drift in float16 and
bfloat16, on the tiny test models with biases zeroed (CPU, seconds).

    python -m benchmarks.half_precision

Per family and dtype: the largest forward difference under ``lrp()`` relative to the logit
scale, the relative conservation error of ``explain`` (batch 2, 16 tokens), the verification's
leak probe, and whether the explanation verified. float32 as the reference row.
Writes ``benchmarks/results/half_precision.{json,md}``.
"""

from __future__ import annotations

import json

SEED = 0


def main() -> None:
    import torch

    import mambalrp
    from benchmarks.common import RESULTS, machine_info
    from mambalrp.testing import tiny_mamba, tiny_mamba2

    families = {
        "mamba": lambda: tiny_mamba(0, zero_biases=True),
        "falcon_mamba": lambda: tiny_mamba(0, falcon=True, zero_biases=True),
        "mamba2": lambda: tiny_mamba2(0, zero_biases=True),
    }
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(SEED))
    rows = []
    for name, make in families.items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            model = make().to(dtype)
            with torch.no_grad():
                own = model(ids, use_cache=False).logits.float()
                with mambalrp.lrp(model):
                    patched = model(ids, use_cache=False).logits.float()
            exp = mambalrp.explain(model, ids)
            verification = mambalrp.verify(model)
            rows.append({
                "family": name,
                "dtype": str(dtype).removeprefix("torch."),
                "forward_relative": (patched - own).abs().max().item() / own.abs().max().item(),
                "conservation_relative": (exp.conservation_delta.abs() / exp.logit.abs()).max().item(),
                "leak_probe": verification.leak,
                "verified": exp.verified,
            })
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "half_precision.json").write_text(json.dumps({"machine": machine_info(), "seed": SEED, "rows": rows}, indent=2))
    lines = [
        "# Half precision (`benchmarks/half_precision.py`)\n",
        "Tiny test models, biases zeroed, batch 2, 16 tokens, CPU.\n",
        "| family | dtype | forward difference / logit scale | conservation error | leak probe | verified |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['family']} | {r['dtype']} | {r['forward_relative']:.1e} | {r['conservation_relative']:.1e} | "
        f"{r['leak_probe']:.1e} | {r['verified']} |"
        for r in rows
    ]
    (RESULTS / "half_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
