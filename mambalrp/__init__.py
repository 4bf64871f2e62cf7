"""mambalrp: faithful, fast Layer-wise Relevance Propagation for Mamba models.

Quick start::

    import mambalrp
    exp = mambalrp.explain(model, input_ids)      # MambaLRP, next-token arg-max logit
    exp.relevance                                  # (batch, seq)
    gen = mambalrp.explain_generation(model, prompt_ids, max_new_tokens=20)  # every generated token
    gen.save("gen.mlrp"); same = mambalrp.load("gen.mlrp")
    print(exp.render(tokens=tokenizer.convert_ids_to_tokens(input_ids[0])))
"""

from mambalrp.adapters import Adapter, register_adapter, registered_adapters, supported_families, unregister_adapter
from mambalrp.check import RuleReport, check_rules
from mambalrp.context import LRPContext, lrp
from mambalrp.dataset import explain_dataset  # Ray is imported only when it runs
from mambalrp.errors import ExplanationFileError, InputError, MambaLRPError, UnsupportedModelError
from mambalrp.explain import explain
from mambalrp.explanation import Explanation
from mambalrp.generation import explain_generation
from mambalrp.serialization import load
from mambalrp.verification import Verification, VerificationError, forget, verify
from mambalrp.functional.dispatch import use_backend
from mambalrp.rules import GRADIENT, LN_ONLY, MAMBALRP, LRP0, Epsilon, Gamma, RuleSet, get_rules

__version__ = "0.1.0"

__all__ = [
    "GRADIENT",
    "LN_ONLY",
    "LRP0",
    "MAMBALRP",
    "Adapter",
    "Epsilon",
    "Explanation",
    "ExplanationFileError",
    "Gamma",
    "InputError",
    "LRPContext",
    "MambaLRPError",
    "RuleReport",
    "RuleSet",
    "UnsupportedModelError",
    "Verification",
    "VerificationError",
    "check_rules",
    "explain",
    "explain_dataset",
    "explain_generation",
    "forget",
    "get_rules",
    "load",
    "lrp",
    "register_adapter",
    "registered_adapters",
    "supported_families",
    "unregister_adapter",
    "use_backend",
    "verify",
]
