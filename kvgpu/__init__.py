"""kvgpu: place many LLMs on many GPUs, minimising the worst GPU's KV cache pressure."""
from kvgpu.problem import InvalidInstance, make_instance

__all__ = ["InvalidInstance", "make_instance"]
