"""mambalrp: faithful, fast Layer-wise Relevance Propagation for Mamba models.

Quick start::

    import mambalrp
    exp = mambalrp.explain(model, input_ids)      # MambaLRP, next-token arg-max logit
    exp.relevance                                  # (batch, seq)
    print(exp.render(tokens=tokenizer.convert_ids_to_tokens(input_ids[0])))
"""

from mambalrp.adapters import Adapter, register_adapter, registered_adapters, supported_families, unregister_adapter
from mambalrp.check import RuleReport, check_rules
from mambalrp.context import LRPContext, lrp
from mambalrp.dataset import explain_dataset  # Ray is imported only when it runs
from mambalrp.errors import InputError, MambaLRPError, UnsupportedModelError
from mambalrp.explain import explain
from mambalrp.explanation import Explanation
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
    "forget",
    "get_rules",
    "lrp",
    "register_adapter",
    "registered_adapters",
    "supported_families",
    "unregister_adapter",
    "use_backend",
    "verify",
]
