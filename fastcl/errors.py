"""Exceptions fastcl raises. Each names the problem; none leaves state half-changed."""


class FastclError(RuntimeError):
    """Base class for fastcl errors."""


class PatchError(FastclError):
    """The model cannot be patched or unpatched as asked."""


class InputError(FastclError, ValueError):
    """A served request is malformed (dtype, range, shape)."""


class BackendUnavailable(FastclError):
    """A requested compute backend cannot run here; the message says why."""


class ConsolidationError(FastclError):
    """consolidate() or rollback() refused; the weights were not touched."""


class StateFileError(FastclError):
    """A state file is corrupt, truncated or belongs to another model."""


class ReplicaMismatchError(FastclError):
    """Replicas that must hold identical state do not; `ranks` lists those off the majority."""

    def __init__(self, message: str, ranks=()):
        super().__init__(message)
        self.ranks = list(ranks)
