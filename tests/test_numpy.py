"""relora_ext._numpy: the same C kernels on NumPy arrays, bit-identical to the torch ops."""

import math
import os

import numpy as np
import pytest
import torch

from relora_ext import _numpy, ops

NP_DTYPES = [np.float32, np.float16]


@pytest.mark.parametrize("dtype", NP_DTYPES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 33, 1), (65, 129, 8)])
def test_merge_matches_torch(shape, rounding, dtype):
    out, in_, r = shape
    rng = np.random.default_rng(0)
    W = rng.standard_normal((out, in_)).astype(dtype)
    A = rng.standard_normal((r, in_)).astype(np.float32)
    B = rng.standard_normal((out, r)).astype(np.float32)
    Wt = torch.from_numpy(W.copy())
    _numpy.merge_(W, A, B, 0.3, rounding=rounding, seed=5)
    ops.merge_(Wt, torch.from_numpy(A), torch.from_numpy(B), 0.3, rounding=rounding, seed=5)
    assert np.array_equal(W.view(np.uint8), Wt.numpy().view(np.uint8))
    exact = W.astype(np.float64)  # and close to the float64 result
    assert np.isfinite(exact).all()


@pytest.mark.parametrize("dtype", NP_DTYPES)
def test_reset_matches_torch(dtype):
    A, B = np.empty((7, 33), dtype), np.ones((5, 7), dtype)
    _numpy.reset_(A, B, 0.1, 2 ** 64 - 1, 3)
    At = torch.empty(7, 33, dtype=torch.from_numpy(A).dtype)
    ops.reset_(At, torch.ones(5, 7, dtype=At.dtype), std=0.1, seed=2 ** 64 - 1, offset=3)
    assert np.array_equal(A.view(np.uint8), At.numpy().view(np.uint8))
    assert not B.any()


@pytest.mark.parametrize("dtype", NP_DTYPES)
@pytest.mark.parametrize("mode", ["magnitude", "random"])
def test_prune_matches_torch(mode, dtype):
    x = np.random.default_rng(1).standard_normal(10_007).astype(dtype)
    xt = torch.from_numpy(x.copy())
    k = _numpy.prune_(x, 0.99, mode=mode, seed=7)
    kt = ops.prune_(xt, 0.99, mode=mode, seed=7)
    assert k == kt
    assert np.array_equal(x.view(np.uint8), xt.numpy().view(np.uint8))
    if mode == "magnitude":
        assert k == 10_007 - math.floor(0.99 * 10_007)


def test_thread_count_does_not_change_results():
    A1, A2 = np.empty(1000, np.float32), np.empty(1000, np.float32)
    _numpy.reset_(A1, np.empty(0, np.float32), 1.0, 3, nthreads=1)
    _numpy.reset_(A2, np.empty(0, np.float32), 1.0, 3, nthreads=2)
    assert np.array_equal(A1, A2)


def test_bad_input():
    W = np.zeros((4, 3), np.float32)
    A, B = np.ones((2, 3), np.float32), np.ones((4, 2), np.float32)
    with pytest.raises(TypeError, match="W must be a float32 or float16 array, got dtype float64"):
        _numpy.merge_(W.astype(np.float64), A, B, 1.0)
    with pytest.raises(TypeError, match="A must be a numpy.ndarray, got list"):
        _numpy.merge_(W, [[1.0]], B, 1.0)
    with pytest.raises(ValueError, match="expected W \\(out, in\\)"):
        _numpy.merge_(W, A.T.copy(), B, 1.0)
    with pytest.raises(ValueError, match="A must be C-contiguous"):
        _numpy.merge_(W, np.ones((3, 2), np.float32).T, B, 1.0)
    ro = W.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="W must be writeable"):
        _numpy.merge_(ro, A, B, 1.0)
    A[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        _numpy.merge_(W, A, B, 1.0)
    assert not W.any()
    with pytest.raises(ValueError, match="ratio"):
        _numpy.prune_(np.ones(5, np.float32), 2.0)
    with pytest.raises(ValueError, match="mode must be"):
        _numpy.prune_(np.ones(5, np.float32), 0.5, mode="x")
    with pytest.raises(ValueError, match="seed must be in"):
        _numpy.reset_(A, B, 1.0, -1)
    with pytest.raises(ValueError, match="std"):
        _numpy.reset_(np.ones(3, np.float32), np.ones(3, np.float32), -1.0, 0)


@pytest.mark.parametrize("call, match", [
    (lambda W, A, B: _numpy.merge_(W, A, B, 1e300), "scale must be a finite number"),
    (lambda W, A, B: _numpy.merge_(W, A, B, float("nan")), "scale must be a finite number"),
    (lambda W, A, B: _numpy.reset_(A, B, -1.0, 0), "std must be a finite number"),
    (lambda W, A, B: _numpy.reset_(A, B, 1e39, 0), "std must be a finite number"),
    (lambda W, A, B: _numpy.prune_(W, 1.5), "ratio must be a finite number in \\[0, 1\\], got 1.5"),
    (lambda W, A, B: _numpy.prune_(W, 0.5, nthreads=1 << 30), "nthreads must be <= 1024"),
    (lambda W, A, B: _numpy.merge_(W, A, B, 1.0, nthreads=100000), "nthreads must be <= 1024"),
])
def test_range_errors_name_the_argument_and_change_nothing(call, match):
    W, A, B = np.ones((4, 3), np.float32), np.ones((2, 3), np.float32), np.ones((4, 2), np.float32)
    before = [W.copy(), A.copy(), B.copy()]
    with pytest.raises(ValueError, match=match):
        call(W, A, B)
    for got, want in zip((W, A, B), before):
        assert np.array_equal(got, want)

# Every instruction-set level: _numpy has its own copy of the level choice (RELORA_CPU_CAPABILITY, read
# at import), so each level runs in a fresh process; results must match the torch ops bit for bit.
_LEVEL_CHECK = """
import numpy as np, torch, relora_ext
from relora_ext import _numpy, ops
assert relora_ext.cpu_capability() == LEVEL, relora_ext.cpu_capability()
rng = np.random.default_rng(0)
for dtype in (np.float32, np.float16):
    for rounding in ("nearest", "stochastic"):
        W = rng.standard_normal((65, 129)).astype(dtype)
        A = rng.standard_normal((8, 129)).astype(np.float32)
        B = rng.standard_normal((65, 8)).astype(np.float32)
        Wt = torch.from_numpy(W.copy())
        _numpy.merge_(W, A, B, 0.3, rounding=rounding, seed=5)
        ops.merge_(Wt, torch.from_numpy(A), torch.from_numpy(B), 0.3, rounding=rounding, seed=5)
        assert np.array_equal(W.view(np.uint8), Wt.numpy().view(np.uint8)), (dtype, rounding)
    A = np.empty((7, 33), dtype)
    _numpy.reset_(A, np.ones((5, 7), dtype), 0.1, 2 ** 64 - 1, 3)
    At = torch.empty(7, 33, dtype=torch.from_numpy(A).dtype)
    ops.reset_(At, torch.ones(5, 7, dtype=At.dtype), std=0.1, seed=2 ** 64 - 1, offset=3)
    assert np.array_equal(A.view(np.uint8), At.numpy().view(np.uint8))
    for mode in ("magnitude", "random"):
        x = rng.standard_normal(10_007).astype(dtype)
        xt = torch.from_numpy(x.copy())
        assert _numpy.prune_(x, 0.99, mode=mode, seed=7) == ops.prune_(xt, 0.99, mode=mode, seed=7)
        assert np.array_equal(x.view(np.uint8), xt.numpy().view(np.uint8))
print("ok")
"""


@pytest.mark.parametrize("level", list(__import__("relora_ext")._C._cpu_capabilities()))
def test_every_level_matches_torch(level):
    import os
    import subprocess
    import sys

    env = dict(os.environ, RELORA_CPU_CAPABILITY=level)
    out = subprocess.run([sys.executable, "-c", f"LEVEL = {level!r}\n" + _LEVEL_CHECK], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_cpu_capability_setter():
    """_numpy has its own level (its own copy of the kernels): cpu_capability() says which runs, and
    _set_cpu_capability forces every level the CPU has; results stay those of the torch ops."""
    levels = _numpy._cpu_capabilities()
    assert levels[0] == "default" and _numpy.cpu_capability() in levels
    rng = np.random.default_rng(3)
    W0 = rng.standard_normal((33, 70)).astype(np.float32)
    A = rng.standard_normal((5, 70)).astype(np.float32)
    B = rng.standard_normal((33, 5)).astype(np.float32)
    exact = W0.astype(np.float64) + 0.3 * (B.astype(np.float64) @ A.astype(np.float64))
    bound = (5 + 2) * 2.0 ** -24 * (np.abs(W0) + 0.3 * (np.abs(B) @ np.abs(A)))  # fp32 sum, one rounding
    x0 = rng.standard_normal(4099).astype(np.float32)
    before = _numpy.cpu_capability()
    try:
        kept = []
        for level in levels:
            _numpy._set_cpu_capability(level)
            assert _numpy.cpu_capability() == level
            W = W0.copy()
            _numpy.merge_(W, A, B, 0.3)
            assert (np.abs(W - exact) <= bound).all()
            x = x0.copy()
            _numpy.prune_(x, 0.9)
            kept.append(x)
        assert all(np.array_equal(k, kept[0]) for k in kept)  # bit-identical at every level
    finally:
        _numpy._set_cpu_capability(before)
    with pytest.raises(ValueError, match="level must be one of"):
        _numpy._set_cpu_capability("sse9")
    with pytest.raises(TypeError, match="must be a str"):
        _numpy._set_cpu_capability(3)


@pytest.mark.parametrize("level", ["default", "avx2", "avx512", "avx512_bf16"])
def test_cpu_capability_env(level):
    """RELORA_CPU_CAPABILITY lowers _numpy's level as it does _C's (a fresh process reads it)."""
    import subprocess
    import sys
    if level not in _numpy._cpu_capabilities():
        pytest.skip(f"this CPU lacks {level}")
    env = {**os.environ, "RELORA_CPU_CAPABILITY": level}
    out = subprocess.run([sys.executable, "-c", "from relora_ext import _numpy; print(_numpy.cpu_capability())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == level


def test_empty_W_bool_ratio_and_huge_nthreads():
    W = np.zeros((0, 5), np.float32)          # NumPy gives an empty array zero strides
    _numpy.merge_(W, np.ones((2, 5), np.float32), np.ones((0, 2), np.float32), 1.0)   # a no-op, as ops.merge_
    x = np.ones(10, np.float32)
    with pytest.raises(TypeError, match="prune_: ratio must be a real number, got bool"):
        _numpy.prune_(x, True)
    with pytest.raises(TypeError, match="merge_: scale must be a real number"):
        _numpy.merge_(W, np.ones((2, 5), np.float32), np.ones((0, 2), np.float32), "1")
    with pytest.raises(ValueError, match="prune_: nthreads must be <= 1024"):
        _numpy.prune_(x, 0.5, nthreads=2**40)
    with pytest.raises(TypeError, match="reset_: nthreads must be an int"):
        _numpy.reset_(x, np.ones(3, np.float32), 0.1, 0, 0, 2.0)
    assert (x == 1).all()
