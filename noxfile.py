"""The transformers version matrix: ``make test-matrix`` (``nox``), each release in its own
virtual environment under ``.nox/``.

``make test`` (and so CI) runs the whole suite with the newest supported transformers; this runs
the model tests, the ones whose outcome depends on transformers' modeling code, against the
oldest supported minor release, one in the middle and the newest. The supported range in
``setup.py`` and ``docs/support.md`` is the range tested here.
"""

from __future__ import annotations

import os

import nox

TRANSFORMERS = ["4.52.4", "4.57.6", "5.24.0"]
MODEL_TESTS = [
    "tests/test_models.py",
    "tests/test_hybrids.py",
    "tests/test_check_rules.py",
    "tests/test_explain_api.py",
    "tests/test_restore_and_errors.py",
    "tests/test_recompute.py",
    "tests/test_verification.py",
    "tests/test_lookalike_property.py",
    "tests/test_vim.py",
    "tests/test_howto_adapters.py",
]
TORCH = os.environ.get("TORCH", "torch==2.13.0")  # the CPU build, as in the Makefile

nox.options.sessions = ["models"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
@nox.parametrize("transformers", TRANSFORMERS)
def models(session: nox.Session, transformers: str) -> None:
    """The model tests against one transformers release (``nox -s "models(transformers='4.52.4')"``)."""
    session.install(TORCH)
    session.install("-e", ".", f"transformers=={transformers}", "pytest>=7", "hypothesis>=6", "packaging")
    session.run("python", "-c", "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *MODEL_TESTS, *session.posargs)
