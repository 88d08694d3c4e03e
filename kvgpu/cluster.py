"""The cluster of a model file and a command line, read once for every entry point.

A model file gives the models and, beside them, the cluster: ``gpus``, ``gpu_mem``,
``reserve_gb``, ``nodes`` / ``gpus_per_node``.  ``solve``, ``certify``, ``replan``, ``size``
and ``size --headroom`` all take the cluster from :func:`read`, so that no entry point drops a
field the file gives: each passes :meth:`Cluster.rules` whole to the API, which honours every
rule or refuses it by name (:func:`kvgpu.capacity.size` refuses what names GPU ids before the
cluster is sized).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Cluster fields of a model file (besides ``models`` and ``description``).
FIELDS = ("gpus", "gpu_mem", "reserve_gb", "nodes", "gpus_per_node", "out_of_service")
#: The fields that are rules of the placement: keyword arguments of :func:`kvgpu.solve`,
#: :func:`kvgpu.headroom` and :func:`kvgpu.size`, passed on as they are.
RULES = ("reserve_gb", "nodes", "gpus_per_node")


@dataclass(frozen=True)
class Cluster:
    """A cluster as the file and the command line give it (None: not given).

    Attributes
    ----------
    gpus : int or None -- number of GPUs.
    gpu_mem : float, list of float, or None -- GB per GPU (one, or one per GPU).
    reserve_gb : float, list of float, or None -- GB kept off each GPU for the serving engine.
    nodes : list of lists of int, or None -- GPU ids per node.
    gpus_per_node : int or None -- GPUs per node (consecutive ids).
    out_of_service : list of int or None -- GPUs no model may use (the file's, and ``--drain``);
        a rule of :func:`kvgpu.solve` that sizing refuses (it names GPU ids), so not in
        :meth:`rules`.
    flags : tuple of str -- the command-line flags that set a field (for messages).
    """

    gpus: int | None = None
    gpu_mem: Any = None
    reserve_gb: Any = None
    nodes: list | None = None
    gpus_per_node: int | None = None
    out_of_service: list | None = None
    flags: tuple = field(default=())

    def rules(self) -> dict:
        """The rule fields as keyword arguments (``reserve_gb``, ``nodes``, ``gpus_per_node``)."""
        return {k: getattr(self, k) for k in RULES}

    def given(self) -> list[str]:
        """The rule fields set (by the file or a flag), in :data:`RULES` order."""
        return [k for k in RULES if getattr(self, k) is not None]


def read(options: dict, *, gpus=None, gpu_mem=None, reserve_gb=None, gpus_per_node=None, drain=None) -> Cluster:
    """The cluster of a file's ``options`` (as :func:`kvgpu.io.read_models` returns them),
    overridden by the command line's values that are not None.

    ``gpus_per_node`` from the command line replaces the file's ``nodes`` too (they are two
    ways of saying the same thing); ``drain`` (``--drain``) adds to the file's
    ``out_of_service``: a GPU the file takes out stays out.  Values are passed on as given: the
    API checks them against the GPU count.
    """
    fields = {k: options.get(k) for k in FIELDS}
    flags = []
    for key, value in (("gpus", gpus), ("gpu_mem", gpu_mem), ("reserve_gb", reserve_gb),
                       ("gpus_per_node", gpus_per_node)):
        if value is not None:
            fields[key] = value
            flags.append("--" + key.replace("_", "-"))
    if gpus_per_node is not None:
        fields["nodes"] = None
    if drain:
        off = fields["out_of_service"]
        fields["out_of_service"] = sorted(set(off if isinstance(off, (list, tuple)) else []) | set(drain))
        flags.append("--drain")
    return Cluster(**fields, flags=tuple(flags))
