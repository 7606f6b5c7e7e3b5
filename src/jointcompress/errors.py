"""One error type per kind of user mistake, all under JointCompressError.

The CLI prints these as one clear message (no traceback unless --debug); anything else
that escapes is a bug in jointcompress, not in the user's input.
"""


class JointCompressError(Exception):
    """Base class: a problem the user can fix; the message names it and the fix."""


class RecipeError(JointCompressError):
    """A recipe is invalid: unknown key, wrong type, value out of range, impossible combination."""


class ArtifactError(JointCompressError):
    """A saved artifact is truncated, tampered with, of another version, or does not fit the model."""


class DataError(JointCompressError):
    """Training or evaluation data has the wrong shape, dtype or non-finite values."""


class TrainingError(JointCompressError):
    """Training could not continue (e.g. repeated non-finite losses)."""


class UnsupportedModelError(JointCompressError):
    """The model, or one of its modules, cannot go through a stage; the message names the module and why."""
