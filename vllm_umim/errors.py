"""Errors raised for bad input: each names the file or field at fault and what is wrong with it."""


class UmimError(ValueError):
    """Base class: a user-facing problem with UMIM input (files, tokenizer, request fields)."""


class RulesFileError(UmimError):
    """A rules file is missing, truncated, corrupted, or not a UMIM rules file."""


class ModuleFileError(UmimError):
    """A merge module file is missing, corrupted, or lacks tensors/metadata."""


class MismatchError(UmimError):
    """Rules, merge module, model and tokenizer do not belong together."""


class AlignmentError(RuntimeError):
    """A segmentation, or the teacher/student rows of a batch, disagree (App. C: never align
    silently). An internal consistency error, not bad user input."""


class SelectionError(UmimError):
    """A rule selection cannot be made as asked (no harm scores, a target out of reach)."""
