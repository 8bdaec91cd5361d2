"""User-facing errors.

Every error a user can cause (a corrupt file, a wrong shape, an unknown architecture, a plan for
another model) is an :class:`AdatsqError`. The CLI prints it on one line and exits with code 2;
anything else escaping is a bug in adatsq.
"""

from __future__ import annotations


class AdatsqError(Exception):
    """Base class of errors caused by the user's input, printed as one line by the CLI."""

    exit_code = 2


class InputError(AdatsqError, ValueError):
    """A file, folder, model or argument given by the user cannot be used."""


class UnsupportedArchitectureError(InputError):
    """The model's class has no signature adapter."""


class PlanError(InputError):
    """A precision plan is malformed, of an unknown version, or for another model."""


class ExportError(AdatsqError, RuntimeError):
    """torch.export / ONNX export of a model failed."""
