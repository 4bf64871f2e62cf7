"""The model's state during an explanation: one call at a time per model, eval mode and frozen
parameters inside, and an exact restoration afterwards that never stops half-way.

* :func:`exclusive` serialises everything mambalrp does to one model instance (``explain``,
  ``check_rules``, ``verify``, ``with lrp(model)``) across threads: patching forwards is a change
  to shared objects, so two threads explaining one model would otherwise see each other's patches
  and restore each other's state as if it were the user's.
* :func:`frozen` puts the model in eval mode without parameter gradients and restores modes,
  ``train()`` overrides and ``requires_grad`` flags exactly.
* :func:`restore_all` runs every restoring step even when some fail, and re-raises the error
  that ended the call (or the first restoring error if the call succeeded).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises mambalrp's work on ``model`` (created on first use)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def exclusive(model: nn.Module) -> Iterator[None]:
    """Hold ``model``'s lock: other threads' explanations of the same model wait until this one
    has restored it. Re-entrant, so nested calls in one thread do not deadlock."""
    with model_lock(model):
        yield


def restore_all(steps: Iterable[Callable[[], object]]) -> None:
    """Run every step; if some raise, run the rest anyway and raise the first error at the end.

    Used in ``finally`` blocks: Python chains the error raised here to the one that is already
    propagating, and callers that need the original error to win catch it (see :func:`frozen`).
    """
    first: BaseException | None = None
    for step in steps:
        try:
            step()
        except BaseException as err:  # noqa: BLE001 - every step must run
            first = first or err
    if first is not None:
        raise first


@contextlib.contextmanager
def restoring(steps: list[Callable[[], object]]) -> Iterator[list[Callable[[], object]]]:
    """Yield a list to which the body appends restoring steps; on exit run them all in reverse.

    If the body raised, its error propagates and a failing restoring step does not replace it;
    if the body succeeded, the first restoring error is raised.
    """
    try:
        yield steps
    except BaseException:
        with contextlib.suppress(BaseException):
            restore_all(reversed(steps))
        raise
    restore_all(reversed(steps))


def _set_mode(module: nn.Module, mode: bool) -> None:
    # A class that overrides train() may keep more state than ``training``: call it.
    if module.training != mode or type(module).train is not nn.Module.train:
        module.train(mode)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients inside; the exact previous state restored on exit.

    Nothing is changed (and nothing needs restoring) for a model already in eval mode with
    frozen parameters. Otherwise ``model.eval()`` is called (so ``train()`` overrides run), and on
    exit each module gets its own previous mode back through its own ``train()`` in pre-order, so
    that every override sees the final mode last.
    """
    modes = [(m, m.training) for m in model.modules()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    with restoring([]) as undo:
        if any(mode for _, mode in modes):
            undo.extend(lambda m=m, mode=mode: _set_mode(m, mode) for m, mode in reversed(modes))
            model.eval()
        for p in trainable:
            undo.append(lambda p=p: p.requires_grad_(True))
            p.requires_grad_(False)
        yield


@contextlib.contextmanager
def autograd_enabled() -> Iterator[None]:
    """Gradients on, and out of ``torch.inference_mode()`` if the caller is inside it (the
    backward pass of an explanation needs autograd; inference mode forbids it)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield
