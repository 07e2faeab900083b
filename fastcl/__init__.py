"""fastcl: a deployed language model that keeps learning from the traffic it serves.

    learner = fastcl.patch(model, rank=16)   # every decoder linear gets a low-rank fast-weight path
    learner.observe(input_ids)               # the served forward, accumulating low-rank gradients
    learner.step(); learner.consolidate()    # update the fast weights; fold them into the weights
"""

from . import models
from ._version import __version__
from .config import MLP_ENTITY_KEYED, LearnerConfig
from .errors import (BackendUnavailable, ConsolidationError, FastclError, InputError, PatchError,
                     ReplicaMismatchError, StateFileError)
from .info import info
from .layers import FastLinear
from .learner import Learner
from .patcher import PatchReport, patch, unpatch

__all__ = [
    "BackendUnavailable", "ConsolidationError", "FastLinear", "FastclError", "InputError", "Learner",
    "LearnerConfig", "MLP_ENTITY_KEYED", "PatchError", "PatchReport", "ReplicaMismatchError", "StateFileError",
    "__version__", "info", "models", "patch", "unpatch",
]
