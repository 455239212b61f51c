"""Errors raised for bad input: each names the file or field at fault and what is wrong with it.

Every error a user can cause is a :class:`UmimError`, and ``vllm-umim`` prints any of them as one
line (``vllm-umim: error: ...``, exit status 2). ``UmimError`` is a ``ValueError``, so vLLM treats
one raised while it validates a request (HTTP 400 on the OpenAI server) or its configuration as
bad input too. ``AlignmentError`` is the exception: an internal consistency check, not bad input.
"""


class UmimError(ValueError):
    """Base class: a user-facing problem with UMIM input (files, tokenizer, options, request fields)."""


class RulesFileError(UmimError):
    """A rules file is missing, truncated, corrupted, or not a UMIM rules file."""


class ModuleFileError(UmimError):
    """A merge module file is missing, corrupted, or lacks tensors/metadata."""


class MismatchError(UmimError):
    """Rules, merge module, model and tokenizer do not belong together."""


class OptionError(UmimError):
    """An option or argument has a value outside what it accepts (a mode, a window, a threshold,
    a training setting, a tensor handed to the matcher)."""


class SelectionError(UmimError):
    """A rule selection cannot be made as asked (no harm scores, a target out of reach)."""


class DataError(UmimError):
    """A data source is missing or malformed, or a built cache folder is unusable."""


class TeacherCacheError(UmimError):
    """A teacher cache was built for other windows, rules or settings, or is incomplete."""


class CheckpointError(UmimError):
    """A resume checkpoint that cannot be read (truncated, not one of ours, or inconsistent)."""


class PromptKindError(UmimError):
    """An unknown fidelity prompt kind was asked for."""


class FidelityArgumentError(UmimError):
    """A ``--variant`` / ``--engine-option`` that is not ``NAME=JSON``, or an unusable cached bf16 line."""


class CeilingError(UmimError):
    """A ceiling measurement cannot run as configured (bad settings, or an output file written with
    other settings)."""


class LmEvalTaskError(UmimError):
    """An lm-eval task could not be defined or run; the message names it."""


class StatisticsError(UmimError):
    """Scores that cannot be summarized: none at all, or paired scores over different items."""


class MergeStateError(UmimError):
    """A request's merge bookkeeping is inconsistent (an engine-internal check that replaces an
    ``assert``): the engine ends that request with an error, never itself."""


class InjectedFault(UmimError):
    """Raised by a UMIM engine hook that the test-only ``VLLM_UMIM_FAULT`` switch names
    (``vllm_umim.engine.faults``)."""


class AlignmentError(RuntimeError):
    """A segmentation, or the teacher/student rows of a batch, disagree (App. C: never align
    silently). An internal consistency error, not bad user input."""
