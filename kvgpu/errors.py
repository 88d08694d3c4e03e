"""The exceptions and warnings kvgpu raises, in one place.

Every error a user can cause is one of these (or a plain ``ValueError`` subclass of them), with
a message that names the model (index and name), the field and the rule it breaks, or, for
files, the file and the line.
"""

from __future__ import annotations


class InvalidInstance(ValueError):
    """An input that breaks a rule of the problem; the message names the model/field and the rule."""


class NoPlacementFound(RuntimeError):
    """No placement satisfies the memory, the rules and the migration budget.

    Attributes
    ----------
    instances : list[int]
        The batch indices of the instances concerned (``[0]`` for :func:`kvgpu.solve`).
    proven : bool
        True when an exact search proved that no placement exists; False when the search
        ran out of budget (``exact_work``) or only heuristics were run (``mode="seed"``).
    """

    def __init__(self, message: str, instances=(), proven: bool = False):
        super().__init__(message)
        self.instances = list(instances)
        self.proven = bool(proven)


class BackendUnavailable(ValueError):
    """The requested backend cannot run on this machine; the message says what is missing."""


class KvgpuWarning(UserWarning):
    """Something in the answer an operator should know (a GPU left with no memory for the KV
    cache, an input read in a non-obvious way); the message names the model and GPU."""
