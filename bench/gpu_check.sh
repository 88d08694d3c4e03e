#!/usr/bin/env bash
# Tier 3: the CUDA backend on a real GPU, one script, well under 8 minutes.
#   bash bench/gpu_check.sh            (from the repository root; writes bench/results/gpu_check.txt)
# 1. installs kvgpu with the gpu and test extras (cupy-cuda12x, numba-cuda[cu12]);
# 2. kvgpu info (the probe must report the device);
# 3. the kernels on the device, no simulator: transfer scan values and the whole seed pipeline
#    against the NumPy engine (tests/cuda/sim_check.py --device), and the device tests of pytest;
# 4. GPU/CPU parity on 1,000 random instances (cuda vs numpy vs numba, seed mode);
# 5. the backend table (quick) and 100,000 ADRS-shaped instances end to end on cuda.
set -euo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.txt") 2>&1
unset NUMBA_ENABLE_CUDASIM KVGPU_DISABLE_GPU
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m pip install -q -e ".[gpu,test]"
kvgpu info
python3 - <<'PY'
from kvgpu import backends
ok, why = backends.probe()["cuda"]
assert ok, f"cuda backend not usable: {why}"
PY
echo "== kernels on the device"
timeout 240 python3 tests/cuda/sim_check.py --device 40 40
timeout 240 python3 -m pytest -q tests/test_cuda_sim.py tests/test_backends.py -k "device or probe or numba"
echo "== parity on 1,000 instances"
timeout 300 python3 - <<'PY'
import time
import numpy as np
import kvgpu
from kvgpu.batch.state import batch_from_instances
from kvgpu.generate import adrs_like, varied
rng = np.random.default_rng(2026)
insts = [adrs_like(rng) for _ in range(700)] + [varied(rng, g_range=(5, 32)) for _ in range(300)]
b = batch_from_instances(insts)
args = (b.sizes, b.demand, b.gpu_mem)
kw = dict(model_mask=b.model_mask, gpu_mask=b.gpu_mask, mode="seed")
res = {}
for e in ("cuda", "numpy", "numba"):
    t0 = time.perf_counter()
    res[e] = kvgpu.solve_batch(*args, backend=e, **kw)
    print(f"{e:<6} {time.perf_counter() - t0:8.2f} s")
for e in ("numpy", "numba"):
    same = (res["cuda"].assignment == res[e].assignment).all(axis=1)
    print(f"cuda == {e}: {same.sum()}/{len(insts)} identical placements")
    assert same.all()
PY
echo "== backend table (quick)"
timeout 300 python3 bench/bench_backends.py --quick --out "$OUT/backends_gpu.json"
echo "== 100,000 ADRS-shaped instances end to end on cuda"
timeout 300 python3 - <<'PY'
import time
import numpy as np
import kvgpu
from kvgpu.batch.state import batch_from_instances
from kvgpu.generate import adrs_like
rng = np.random.default_rng(7)
b = batch_from_instances([adrs_like(rng) for _ in range(100_000)])
args = (b.sizes, b.demand, b.gpu_mem)
kw = dict(model_mask=b.model_mask, gpu_mask=b.gpu_mask, mode="seed")
kvgpu.solve_batch(*(a[:64] for a in args), model_mask=b.model_mask[:64], gpu_mask=b.gpu_mask[:64],
                  backend="cuda", mode="seed")  # compile the kernels
for e in ("cuda", "numba"):
    t0 = time.perf_counter()
    r = kvgpu.solve_batch(*args, backend=e, **kw)
    print(f"100,000 ADRS-shaped, {e}: {time.perf_counter() - t0:.2f} s end to end (target on an H200: < 2 s for cuda)")
PY
date -u
