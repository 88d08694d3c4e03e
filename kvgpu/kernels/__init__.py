"""Kernels of kvgpu (installed as ``kvgpu.kernels``): the delta arithmetic shared by every engine."""
