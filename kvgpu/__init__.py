"""kvgpu: place many LLMs on many GPUs so that the worst GPU's KV cache pressure is as low as possible.

>>> import kvgpu
>>> p = kvgpu.solve([{"name": "a", "model_size": 20, "req_rate": 5, "slo": 5}], gpus=2)
>>> p.assignment.tolist()
[0]
"""
from kvgpu import io  # noqa: F401 -- kvgpu.io.read_models / write_placement after `import kvgpu`
from kvgpu import demand  # noqa: F401 -- kvgpu.demand.read_requests / read_table after `import kvgpu`
from kvgpu.api import compute_model_placement, replan, solve, solve_batch
from kvgpu.capacity import GpuType, HeadroomResult, SizeResult, headroom, size
from kvgpu.errors import BackendUnavailable, InvalidInstance, KvgpuWarning, NoPlacementFound
from kvgpu.policy import ReplayResult, replay
from kvgpu.problem import Problem, build_problem, make_instance
from kvgpu.results import BatchResult, Move, Placement
from kvgpu.schema import ModelSpec, model_specs
from kvgpu.warmup import warmup

__all__ = ["BackendUnavailable", "BatchResult", "GpuType", "HeadroomResult", "InvalidInstance", "KvgpuWarning",
           "ModelSpec", "Move", "NoPlacementFound", "Placement", "Problem", "SizeResult", "build_problem",
           "compute_model_placement", "headroom", "make_instance", "model_specs", "replan", "replay", "ReplayResult",
           "size", "solve", "solve_batch", "warmup"]
__version__ = "0.2.0"
