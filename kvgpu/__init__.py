"""kvgpu: place many LLMs on many GPUs so that the worst GPU's KV cache pressure is as low as possible.

>>> import kvgpu
>>> p = kvgpu.solve([{"name": "a", "model_size": 20, "req_rate": 5, "slo": 5}], gpus=2)
>>> p.assignment.tolist()
[0]
"""
from kvgpu.api import BatchResult, Placement, compute_model_placement, solve, solve_batch
from kvgpu.capacity import GpuType, HeadroomResult, SizeResult, headroom, size
from kvgpu.errors import BackendUnavailable, InvalidInstance, KvgpuWarning, NoPlacementFound
from kvgpu.problem import make_instance
from kvgpu.replan import Move, replan

__all__ = ["BackendUnavailable", "BatchResult", "InvalidInstance", "KvgpuWarning", "Move", "Placement", "compute_model_placement",
           "make_instance", "NoPlacementFound", "replan", "solve", "solve_batch"]
__all__ += ["GpuType", "HeadroomResult", "SizeResult", "headroom", "size"]  # capacity planning
__version__ = "0.1.0"
