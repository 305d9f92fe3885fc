"""relora_ext.numpy_ops: the same C kernels on NumPy arrays, bit-identical to the torch ops."""

import os

import numpy as np
import pytest
import torch

from relora_ext import _C_testing, numpy_ops, ops
from _reference import reference_keep_count

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
    numpy_ops.merge_(W, A, B, 0.3, rounding=rounding, seed=5)
    ops.merge_(Wt, torch.from_numpy(A), torch.from_numpy(B), 0.3, rounding=rounding, seed=5)
    assert np.array_equal(W.view(np.uint8), Wt.numpy().view(np.uint8))
    exact = W.astype(np.float64)  # and close to the float64 result
    assert np.isfinite(exact).all()


@pytest.mark.parametrize("dtype", NP_DTYPES)
def test_reset_matches_torch(dtype):
    A, B = np.empty((7, 33), dtype), np.ones((5, 7), dtype)
    numpy_ops.reset_(A, B, 0.1, 2 ** 64 - 1, 3)
    At = torch.empty(7, 33, dtype=torch.from_numpy(A).dtype)
    ops.reset_(At, torch.ones(5, 7, dtype=At.dtype), std=0.1, seed=2 ** 64 - 1, offset=3)
    assert np.array_equal(A.view(np.uint8), At.numpy().view(np.uint8))
    assert not B.any()


@pytest.mark.parametrize("dtype", NP_DTYPES)
@pytest.mark.parametrize("mode", ["magnitude", "random"])
def test_prune_matches_torch(mode, dtype):
    x = np.random.default_rng(1).standard_normal(10_007).astype(dtype)
    xt = torch.from_numpy(x.copy())
    k = numpy_ops.prune_(x, 0.99, mode=mode, seed=7)
    kt = ops.prune_(xt, 0.99, mode=mode, seed=7)
    assert k == kt
    assert np.array_equal(x.view(np.uint8), xt.numpy().view(np.uint8))
    if mode == "magnitude":
        assert k == reference_keep_count(10_007, 0.99)


def test_thread_count_does_not_change_results():
    A1, A2 = np.empty(1000, np.float32), np.empty(1000, np.float32)
    numpy_ops.reset_(A1, np.empty(0, np.float32), 1.0, 3, nthreads=1)
    numpy_ops.reset_(A2, np.empty(0, np.float32), 1.0, 3, nthreads=2)
    assert np.array_equal(A1, A2)


def test_bad_input():
    W = np.zeros((4, 3), np.float32)
    A, B = np.ones((2, 3), np.float32), np.ones((4, 2), np.float32)
    with pytest.raises(TypeError, match="W must be a float32 or float16 array, got dtype float64"):
        numpy_ops.merge_(W.astype(np.float64), A, B, 1.0)
    with pytest.raises(TypeError, match="A must be a numpy.ndarray, got list"):
        numpy_ops.merge_(W, [[1.0]], B, 1.0)
    with pytest.raises(ValueError, match="expected W \\(out, in\\)"):
        numpy_ops.merge_(W, A.T.copy(), B, 1.0)
    with pytest.raises(ValueError, match="A must be C-contiguous"):
        numpy_ops.merge_(W, np.ones((3, 2), np.float32).T, B, 1.0)
    ro = W.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="W must be writeable"):
        numpy_ops.merge_(ro, A, B, 1.0)
    A[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        numpy_ops.merge_(W, A, B, 1.0)
    assert not W.any()
    with pytest.raises(ValueError, match="ratio"):
        numpy_ops.prune_(np.ones(5, np.float32), 2.0)
    with pytest.raises(ValueError, match="mode must be"):
        numpy_ops.prune_(np.ones(5, np.float32), 0.5, mode="x")
    with pytest.raises(ValueError, match="seed must be in"):
        numpy_ops.reset_(A, B, 1.0, -1)
    with pytest.raises(ValueError, match="std"):
        numpy_ops.reset_(np.ones(3, np.float32), np.ones(3, np.float32), -1.0, 0)


@pytest.mark.parametrize("call, match", [
    (lambda W, A, B: numpy_ops.merge_(W, A, B, 1e300), "scale must be a finite number"),
    (lambda W, A, B: numpy_ops.merge_(W, A, B, float("nan")), "scale must be a finite number"),
    (lambda W, A, B: numpy_ops.reset_(A, B, -1.0, 0), "std must be a finite number"),
    (lambda W, A, B: numpy_ops.reset_(A, B, 1e39, 0), "std must be a finite number"),
    (lambda W, A, B: numpy_ops.prune_(W, 1.5), "ratio must be a finite number in \\[0, 1\\], got 1.5"),
    (lambda W, A, B: numpy_ops.prune_(W, 0.5, nthreads=1 << 30), "nthreads must be <= 1024"),
    (lambda W, A, B: numpy_ops.merge_(W, A, B, 1.0, nthreads=100000), "nthreads must be <= 1024"),
])
def test_range_errors_name_the_argument_and_change_nothing(call, match):
    W, A, B = np.ones((4, 3), np.float32), np.ones((2, 3), np.float32), np.ones((4, 2), np.float32)
    before = [W.copy(), A.copy(), B.copy()]
    with pytest.raises(ValueError, match=match):
        call(W, A, B)
    for got, want in zip((W, A, B), before):
        assert np.array_equal(got, want)

# Every instruction-set level: numpy_ops has its own copy of the level choice (RELORA_CPU_CAPABILITY, read
# at import), so each level runs in a fresh process; results must match the torch ops bit for bit.
_LEVEL_CHECK = """
import numpy as np, torch, relora_ext
from relora_ext import _C_testing, numpy_ops, ops
assert relora_ext.cpu_capability() == LEVEL, relora_ext.cpu_capability()
rng = np.random.default_rng(0)
for dtype in (np.float32, np.float16):
    for rounding in ("nearest", "stochastic"):
        W = rng.standard_normal((65, 129)).astype(dtype)
        A = rng.standard_normal((8, 129)).astype(np.float32)
        B = rng.standard_normal((65, 8)).astype(np.float32)
        Wt = torch.from_numpy(W.copy())
        numpy_ops.merge_(W, A, B, 0.3, rounding=rounding, seed=5)
        ops.merge_(Wt, torch.from_numpy(A), torch.from_numpy(B), 0.3, rounding=rounding, seed=5)
        assert np.array_equal(W.view(np.uint8), Wt.numpy().view(np.uint8)), (dtype, rounding)
    A = np.empty((7, 33), dtype)
    numpy_ops.reset_(A, np.ones((5, 7), dtype), 0.1, 2 ** 64 - 1, 3)
    At = torch.empty(7, 33, dtype=torch.from_numpy(A).dtype)
    ops.reset_(At, torch.ones(5, 7, dtype=At.dtype), std=0.1, seed=2 ** 64 - 1, offset=3)
    assert np.array_equal(A.view(np.uint8), At.numpy().view(np.uint8))
    for mode in ("magnitude", "random"):
        x = rng.standard_normal(10_007).astype(dtype)
        xt = torch.from_numpy(x.copy())
        assert numpy_ops.prune_(x, 0.99, mode=mode, seed=7) == ops.prune_(xt, 0.99, mode=mode, seed=7)
        assert np.array_equal(x.view(np.uint8), xt.numpy().view(np.uint8))
print("ok")
"""


@pytest.mark.parametrize("level", list(_C_testing.cpu_capabilities()))
def test_every_level_matches_torch(level):
    import os
    import subprocess
    import sys

    env = dict(os.environ, RELORA_CPU_CAPABILITY=level)
    out = subprocess.run([sys.executable, "-c", f"LEVEL = {level!r}\n" + _LEVEL_CHECK], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_cpu_capability_setter():
    """numpy_ops has its own level (its own copy of the kernels): cpu_capability() says which runs, and
    _set_cpu_capability forces every level the CPU has; results stay those of the torch ops."""
    levels = numpy_ops._cpu_capabilities()
    assert levels[0] == "default" and numpy_ops.cpu_capability() in levels
    rng = np.random.default_rng(3)
    W0 = rng.standard_normal((33, 70)).astype(np.float32)
    A = rng.standard_normal((5, 70)).astype(np.float32)
    B = rng.standard_normal((33, 5)).astype(np.float32)
    exact = W0.astype(np.float64) + 0.3 * (B.astype(np.float64) @ A.astype(np.float64))
    bound = (5 + 2) * 2.0 ** -24 * (np.abs(W0) + 0.3 * (np.abs(B) @ np.abs(A)))  # fp32 sum, one rounding
    x0 = rng.standard_normal(4099).astype(np.float32)
    before = numpy_ops.cpu_capability()
    try:
        kept = []
        for level in levels:
            numpy_ops._set_cpu_capability(level)
            assert numpy_ops.cpu_capability() == level
            W = W0.copy()
            numpy_ops.merge_(W, A, B, 0.3)
            assert (np.abs(W - exact) <= bound).all()
            x = x0.copy()
            numpy_ops.prune_(x, 0.9)
            kept.append(x)
        assert all(np.array_equal(k, kept[0]) for k in kept)  # bit-identical at every level
    finally:
        numpy_ops._set_cpu_capability(before)
    with pytest.raises(ValueError, match="level must be one of"):
        numpy_ops._set_cpu_capability("sse9")
    with pytest.raises(TypeError, match="must be a str"):
        numpy_ops._set_cpu_capability(3)


@pytest.mark.parametrize("level", ["default", "avx2", "avx512", "avx512_bf16"])
def test_cpu_capability_env(level):
    """RELORA_CPU_CAPABILITY lowers numpy_ops's level as it does _C's (a fresh process reads it)."""
    import subprocess
    import sys
    if level not in numpy_ops._cpu_capabilities():
        pytest.skip(f"this CPU lacks {level}")
    env = {**os.environ, "RELORA_CPU_CAPABILITY": level}
    out = subprocess.run([sys.executable, "-c", "from relora_ext import numpy_ops; print(numpy_ops.cpu_capability())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == level


def test_empty_W_bool_ratio_and_huge_nthreads():
    W = np.zeros((0, 5), np.float32)          # NumPy gives an empty array zero strides
    numpy_ops.merge_(W, np.ones((2, 5), np.float32), np.ones((0, 2), np.float32), 1.0)   # a no-op, as ops.merge_
    x = np.ones(10, np.float32)
    with pytest.raises(TypeError, match="prune_: ratio must be a real number, got bool"):
        numpy_ops.prune_(x, True)
    with pytest.raises(TypeError, match="merge_: scale must be a real number"):
        numpy_ops.merge_(W, np.ones((2, 5), np.float32), np.ones((0, 2), np.float32), "1")
    with pytest.raises(ValueError, match="prune_: nthreads must be <= 1024"):
        numpy_ops.prune_(x, 0.5, nthreads=2**40)
    with pytest.raises(TypeError, match="reset_: nthreads must be an int"):
        numpy_ops.reset_(x, np.ones(3, np.float32), 0.1, 0, 0, 2.0)
    assert (x == 1).all()


def test_reset_std_bound_is_the_torch_ops_one():
    """float16 std = 1e5 once wrote Inf into 26 of 64 entries; the bound is the kernels' (ops.reset_std_max)."""
    A, B = np.full(64, 2.0, dtype=np.float16), np.ones(3, dtype=np.float16)
    with pytest.raises(ValueError, match="reset_: std must be a finite number in"):
        numpy_ops.reset_(A, B, 1e5, 0)
    assert (A == 2).all() and (B == 1).all()
    for dtype, tdtype in ((np.float16, torch.float16), (np.float32, torch.float32)):
        limit = ops.reset_std_max(tdtype)
        A, B = np.zeros(64, dtype=dtype), np.ones(3, dtype=dtype)
        with pytest.raises(ValueError, match="reset_: std"):
            numpy_ops.reset_(A, B, float(np.nextafter(np.float32(limit), np.float32(np.inf))), 0)
        numpy_ops.reset_(A, B, limit, 0)
        assert np.isfinite(A).all()


def test_overlap_names_both_arrays():
    W = np.ones((8, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="merge_: W overlaps A in memory"):
        numpy_ops.merge_(W, W[:2], np.ones((8, 2), dtype=np.float32), 1.0)
    with pytest.raises(ValueError, match="merge_: W overlaps B in memory"):
        numpy_ops.merge_(W, np.ones((2, 16), dtype=np.float32), W.reshape(-1)[:16].reshape(8, 2), 1.0)
    a = np.ones(10, dtype=np.float32)
    with pytest.raises(ValueError, match="reset_: B overlaps A in memory"):
        numpy_ops.reset_(a[:5], a[4:], 1.0, 0)
    assert (W == 1).all() and (a == 1).all()


def test_numpy_scalars_are_taken_and_bools_and_missing_seeds_refused():
    from relora_ext import numpy_ops

    W = np.zeros((4, 3), np.float32)
    A, B = np.ones((2, 3), np.float32), np.ones((4, 2), np.float32)
    numpy_ops.merge_(W, A, B, np.float32(0.5))  # a NumPy scalar scale, as ops.merge_ takes
    assert np.all(W == 1.0)
    numpy_ops.reset_(A, B, np.float64(0.02), np.int64(3))
    with pytest.raises(TypeError, match="seed must be an int, got bool"):
        numpy_ops.reset_(A, B, 0.02, True)
    with pytest.raises(ValueError, match="rounding='stochastic' needs a seed"):
        numpy_ops.merge_(W, A, B, 0.5, rounding="stochastic")
    before = W.copy()
    with pytest.raises(ValueError, match="mode='random' needs a seed"):
        numpy_ops.prune_(W, 0.5, mode="random")
    assert np.array_equal(W, before)
