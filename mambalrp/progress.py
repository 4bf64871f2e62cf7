"""Progress bars (tqdm) for long work: generations, recomputation over long inputs, benchmarks.

A bar is shown when the caller asks for one (``progress=True``), or, by default
(``progress=None``), when standard error is a terminal and the environment variable
``MAMBALRP_PROGRESS`` is not ``0``. ``progress=False`` or ``MAMBALRP_PROGRESS=0`` keeps every
call quiet; ``MAMBALRP_PROGRESS=1`` shows bars even when standard error is not a terminal (logs).
An explicit ``progress=True`` / ``False`` wins over the environment variable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

ENV_VAR = "MAMBALRP_PROGRESS"
_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether a progress bar should be shown.

    Args:
        progress: ``True`` or ``False`` to decide explicitly; ``None`` for the default (the
            environment variable ``MAMBALRP_PROGRESS`` if set to ``0``/``1``, else whether
            standard error is a terminal).

    Returns:
        ``True`` to show a bar.
    """
    if progress is not None:
        return bool(progress)
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    progress: bool | None = None,
) -> Any:
    """A ``tqdm`` bar on standard error, disabled when :func:`progress_enabled` says so.

    Use it as tqdm: iterate over it, or call ``update(n)`` and ``close()`` (or use it as a context
    manager). A disabled bar prints nothing and costs next to nothing.

    Args:
        iterable: What to iterate over, or ``None`` for a manually updated bar.
        total: Number of units (defaults to ``len(iterable)`` when it has one).
        desc: Label in front of the bar.
        unit: Name of one unit.
        progress: See :func:`progress_enabled`.

    Returns:
        A ``tqdm.tqdm`` instance.
    """
    from tqdm import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=not progress_enabled(progress),
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )
