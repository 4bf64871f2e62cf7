"""Exceptions raised by mambalrp."""

from __future__ import annotations


class MambaLRPError(Exception):
    """Base class of mambalrp's errors."""


class UnsupportedModelError(MambaLRPError, TypeError):
    """The model contains no layer, or a layer, that no registered adapter can explain."""


class InputError(MambaLRPError, ValueError):
    """``input_ids``, ``attention_mask``, ``position`` or ``target`` is invalid."""


class ExplanationFileError(MambaLRPError, ValueError):
    """A file given to :func:`mambalrp.load` is not a saved explanation, or was written in a
    format version this release does not read."""
