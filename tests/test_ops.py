"""relora_ext.ops against float64 PyTorch references: merge_, reset_, prune_.

One class per op; `sample_inputs` helpers; `reference_*` oracles in pure PyTorch; opcheck on each op.
"""

import math

import pytest
import torch
from torch.testing import assert_close

import relora_ext
from relora_ext import _C_testing, ops  # _C_testing: the level / merge-path switches and torch.ops.relora_testing
from conftest import DEVICES, requires_cuda
from _reference import (philox_words, reference_keep_count, reference_merge, reference_normals, reference_prune,
                        ulp)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1, 1), (7, 33, 1), (33, 7, 7), (1, 64, 3), (64, 1, 5), (65, 129, 8), (100, 257, 33)]


# ------------------------------------------------------------------------------------------------
# merge


def sample_merge(out, in_, r, wdtype, adtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, in_, generator=g).to(device, wdtype)
    A = torch.randn(r, in_, generator=g).to(device, adtype)
    B = (torch.randn(out, r, generator=g) * 0.1).to(device, adtype)
    return W, A, B


class TestMerge:
    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("adtype", DTYPES)
    @pytest.mark.parametrize("wdtype", DTYPES)
    @pytest.mark.parametrize("shape", SHAPES)
    def test_one_rounding_of_exact(self, shape, wdtype, adtype, device):
        W, A, B = sample_merge(*shape, wdtype, adtype, device)
        scale = 0.37
        exact = reference_merge(W, A, B, scale)
        ops.merge_(W, A, B, scale)
        err = (W.double() - exact).abs()
        # Half an ulp of W's dtype for the one rounding, plus fp32 accumulation error.
        terms = W.double().abs() + abs(scale) * (B.double().abs() @ A.double().abs())
        bound = 0.5 * ulp(exact, wdtype) + 1e-6 * terms + 1e-30
        assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"

    @pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
    def test_rounds_to_nearest_exactly(self, wdtype):
        # r = 1 and exact inputs: fp32 accumulation is exact, so the result is the RNE of exact.
        W = torch.randn(33, 65).to(wdtype)
        A = torch.randint(-8, 8, (1, 65)).float()
        B = torch.randint(-8, 8, (33, 1)).float()
        exact = reference_merge(W, A, B, 2.0 ** -10)
        ops.merge_(W, A, B, 2.0 ** -10)
        assert torch.equal(W, exact.float().to(wdtype))

    def test_beats_bf16_addmm_in_error(self):
        # The reason for one rounding: a bf16 add of a small update often rounds back to W.
        W, A, B = sample_merge(64, 96, 8, torch.bfloat16, torch.bfloat16, seed=3)
        exact = reference_merge(W, A, B, 0.05)
        torch_w = W.clone().addmm_(B, A, alpha=0.05)
        ours = W.clone()
        ops.merge_(ours, A, B, 0.05)
        assert (ours.double() - exact).abs().max() <= (torch_w.double() - exact).abs().max()

    def test_padded_rows_and_transposed_W(self):
        W, A, B = sample_merge(17, 23, 4, torch.float32, torch.float32)
        big = torch.randn(17, 40)
        big[:, :23] = W
        exact = reference_merge(W, A, B, 1.5)
        view = big[:, :23]
        ops.merge_(view, A, B, 1.5)
        assert_close(view.double(), exact, rtol=1e-5, atol=1e-5)
        Wt = W.t().contiguous().t()  # (17, 23) with strides (1, 17)
        ops.merge_(Wt, A, B, 1.5)
        assert_close(Wt.double(), exact, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
    @pytest.mark.parametrize("which", ["A", "B"])
    def test_nonfinite_refused_W_untouched(self, which, bad):
        W, A, B = sample_merge(9, 11, 3, torch.bfloat16, torch.float32)
        before = W.clone()
        (A if which == "A" else B)[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            ops.merge_(W, A, B, 1.0)
        assert torch.equal(W.view(torch.int16), before.view(torch.int16))

    @pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
    def test_stochastic_rounding_unbiased(self, wdtype):
        # W = 1, update = u/4 with u the ulp at 1: nearest always rounds back to 1,
        # stochastic rounds up a quarter of the time, so the mean is 1 + u/4.
        u = 2.0 ** (-7 if wdtype == torch.bfloat16 else -10)
        n = 256
        W = torch.ones(n, n, dtype=wdtype)
        A = torch.ones(1, n)
        B = torch.full((n, 1), u / 4)
        Wn = W.clone()
        ops.merge_(Wn, A, B, 1.0)
        assert bool((Wn == 1).all())
        ops.merge_(W, A, B, 1.0, rounding="stochastic", seed=1234)
        assert set(W.unique().tolist()) == {1.0, 1.0 + u}
        mean = W.double().mean().item()
        sigma = math.sqrt(0.25 * 0.75 / n ** 2) * u
        assert abs(mean - (1 + u / 4)) < 5 * sigma

    def test_stochastic_deterministic_and_thread_independent(self, threads):
        W0, A, B = sample_merge(70, 130, 6, torch.bfloat16, torch.float32)
        results = []
        for nt, seed in [(1, 5), (2, 5), (2, 6)]:
            threads(nt)
            W = W0.clone()
            ops.merge_(W, A, B, 0.01, rounding="stochastic", seed=seed)
            results.append(W)
        assert torch.equal(results[0], results[1])
        assert not torch.equal(results[1], results[2])

    def test_stochastic_on_fp32_is_nearest(self):
        W, A, B = sample_merge(20, 30, 4, torch.float32, torch.float32)
        W2 = W.clone()
        ops.merge_(W, A, B, 0.3)
        ops.merge_(W2, A, B, 0.3, rounding="stochastic", seed=1)
        assert torch.equal(W, W2)

    def test_empty(self):
        W = torch.empty(0, 5)
        ops.merge_(W, torch.ones(2, 5), torch.ones(0, 2), 1.0)

    @pytest.mark.parametrize("wdtype", DTYPES)
    def test_opcheck(self, wdtype):
        W, A, B = sample_merge(7, 9, 2, wdtype, torch.float32)
        torch.library.opcheck(torch.ops.relora.merge_.default, (W, A, B, 0.5, "nearest", 3))
        torch.library.opcheck(torch.ops.relora.merge_.default, (W, A, B, 0.5, "stochastic", 3))

    @pytest.mark.parametrize("args, exc, match", [
        (lambda W, A, B: (W.int(), A, B, 1.0), TypeError, "W must be float32"),
        (lambda W, A, B: (W, A.double(), B.double(), 1.0), TypeError, "A must be float32"),
        (lambda W, A, B: (W, A, B.half(), 1.0), TypeError, "share a dtype"),
        (lambda W, A, B: (W, A.t(), B, 1.0), ValueError, "expected W \\(out, in\\)"),
        (lambda W, A, B: (W, A[:0], B[:, :0], 1.0), ValueError, "r = A.shape\\[0\\] must be >= 1"),
        (lambda W, A, B: (W[0], A, B, 1.0), ValueError, "W must be 2-D"),
        (lambda W, A, B: (W, A, B, float("nan")), ValueError, "scale must be a finite number in"),
        (lambda W, A, B: (W, A, B, "1"), TypeError, "scale must be a real number"),
        (lambda W, A, B: (W, A, B, 1e300), ValueError, "scale must be a finite number in"),
        (lambda W, A, B: (W[:, ::2], A[:, ::2], B, 1.0), ValueError, "unit stride"),
        (lambda W, A, B: (W.requires_grad_(), A, B, 1.0), ValueError, "W requires grad"),
        (lambda W, A, B: (W, A.to("meta"), B, 1.0), ValueError, "one device"),
        (lambda W, A, B: ([[1.0]], A, B, 1.0), TypeError, "W must be a torch.Tensor"),
    ])
    def test_bad_input(self, args, exc, match):
        W, A, B = sample_merge(6, 8, 2, torch.float32, torch.float32)
        with pytest.raises(exc, match=match):
            ops.merge_(*args(W, A, B))

    def test_bad_rounding_and_seed(self):
        W, A, B = sample_merge(6, 8, 2, torch.float32, torch.float32)
        with pytest.raises(ValueError, match="rounding must be"):
            ops.merge_(W, A, B, 1.0, rounding="up")
        with pytest.raises(ValueError, match="seed must be in"):
            ops.merge_(W, A, B, 1.0, seed=-1)
        with pytest.raises(ValueError, match="must not overlap"):
            ops.merge_(W[:, :2], W[:2, 4:6], W[:, 6:8], 1.0)


# ------------------------------------------------------------------------------------------------
# reset


class TestReset:
    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 33), (33, 64), (64, 4099)])
    def test_zeroes_B_and_draws_A(self, shape, dtype, device):
        A = torch.full(shape, 7.0, dtype=dtype, device=device)
        B = torch.ones(shape[::-1], dtype=dtype, device=device)
        ops.reset_(A, B, std=0.5, seed=11, offset=3)
        assert bool((B == 0).all())
        # The draw in dtype is the fp32 draw rounded once.
        A32 = torch.empty(shape, device=device)
        ops.reset_(A32, torch.empty(0, device=device), std=0.5, seed=11, offset=3)
        assert torch.equal(A, A32.to(dtype))

    def test_statistics(self):
        A = torch.empty(512, 1024)
        ops.reset_(A, torch.empty(0), std=0.02, seed=0)
        z = A.double() / 0.02
        n = z.numel()
        assert abs(z.mean().item()) < 5 / math.sqrt(n)
        assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
        # Tails of a normal: |z| > 3 with probability 0.0027.
        tail = (z.abs() > 3).double().mean().item()
        assert abs(tail - 0.0026998) < 5 * math.sqrt(0.0027 / n)

    def test_deterministic_and_thread_independent(self, threads):
        draws = []
        for nt in (1, 2, 1):
            threads(nt)
            A = torch.empty(37, 129)
            ops.reset_(A, torch.empty(3), std=1.0, seed=2 ** 63 + 5, offset=2 ** 40 + 1)
            draws.append(A)
        assert torch.equal(draws[0], draws[1]) and torch.equal(draws[1], draws[2])

    def test_streams_differ(self):
        a, b, c = (torch.empty(100) for _ in range(3))
        ops.reset_(a, torch.empty(0), std=1.0, seed=1, offset=0)
        ops.reset_(b, torch.empty(0), std=1.0, seed=1, offset=1)
        ops.reset_(c, torch.empty(0), std=1.0, seed=2, offset=0)
        assert not torch.equal(a, b) and not torch.equal(a, c)

    def test_prefix_stable(self):
        # Element e depends only on (seed, offset, e): a longer A extends a shorter one.
        short, long = torch.empty(13), torch.empty(100)
        ops.reset_(short, torch.empty(0), std=1.0, seed=4)
        ops.reset_(long, torch.empty(0), std=1.0, seed=4)
        assert torch.equal(short, long[:13])

    def test_opcheck(self):
        A, B = torch.empty(3, 5), torch.ones(4, 3)
        torch.library.opcheck(torch.ops.relora.reset_.default, (A, B, 0.1, 1, 2))

    def test_bad_input(self):
        A, B = torch.empty(3, 5), torch.ones(4, 3)
        with pytest.raises(ValueError, match="std must be a finite number in"):
            ops.reset_(A, B, std=-1.0, seed=0)
        with pytest.raises(ValueError, match="std must be a finite number in"):
            ops.reset_(A, B, std=float("inf"), seed=0)
        with pytest.raises(TypeError, match="share a dtype"):
            ops.reset_(A, B.half(), std=1.0, seed=0)
        with pytest.raises(ValueError, match="A must be contiguous"):
            ops.reset_(A.t(), B, std=1.0, seed=0)
        with pytest.raises(TypeError, match="seed must be an int"):
            ops.reset_(A, B, std=1.0, seed=1.5)
        with pytest.raises(ValueError, match="offset must be in"):
            ops.reset_(A, B, std=1.0, seed=0, offset=2 ** 64)
        with pytest.raises(TypeError, match="A must be float32"):
            ops.reset_(A.long(), B, std=1.0, seed=0)
        with pytest.raises(ValueError, match="A requires grad"):
            ops.reset_(A.requires_grad_(), B, std=1.0, seed=0)


# ------------------------------------------------------------------------------------------------
# prune


def sample_prune(n, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    # Many ties: quantise half of the entries.
    x[::2] = torch.round(x[::2] * 4) / 4
    return x.to(device, dtype)


class TestPrune:
    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.9, 0.99, 1.0])
    @pytest.mark.parametrize("n", [0, 1, 7, 33, 1000, 4099])
    def test_against_reference(self, n, ratio, dtype, device):
        x = sample_prune(n, dtype, seed=n, device=device)
        expected = reference_prune(x.cpu(), ratio)
        kept = ops.prune_(x, ratio)
        assert kept == reference_keep_count(n, ratio)
        assert torch.equal(x.cpu().double(), expected)

    def test_ties_go_to_lower_index(self):
        x = torch.tensor([1.0, -2.0, 2.0, -2.0, 2.0, 0.5])
        assert ops.prune_(x, 0.5) == 3
        assert x.tolist() == [0.0, -2.0, 2.0, -2.0, 0.0, 0.0]

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_all_equal_and_zeros(self, dtype):
        x = torch.full((1001,), -0.25, dtype=dtype)
        assert ops.prune_(x, 0.9) == 101
        assert bool((x[:101] == -0.25).all()) and bool((x[101:] == 0).all())
        z = torch.zeros(50, dtype=dtype)
        z[::2] = -0.0
        assert ops.prune_(z, 0.5) == 25
        assert bool((z == 0).all())

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_nan_is_kept_as_largest(self, dtype):
        x = torch.tensor([1.0, float("nan"), float("inf"), -3.0, float("nan"), 0.5], dtype=dtype)
        assert ops.prune_(x, 0.5) == 3
        assert torch.isnan(x[1]) and torch.isnan(x[4]) and x[2] == float("inf")
        assert x[[0, 3, 5]].tolist() == [0.0, 0.0, 0.0]

    def test_above_2_pow_24(self):
        n = 2 ** 24 + 3
        x = torch.randn(n, generator=torch.Generator().manual_seed(0))
        mag = x.abs()
        k = reference_keep_count(n, 0.99)
        threshold = torch.kthvalue(mag, n - k + 1).values  # the k-th largest (continuous: no ties)
        assert ops.prune_(x, 0.99) == k
        assert int((x != 0).sum()) == k
        assert bool((x[mag >= threshold] == x[mag >= threshold]).all())
        assert bool((x[mag < threshold] == 0).all())

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_random_mode(self, dtype, threads):
        n, ratio = 100_000, 0.9
        x = torch.randn(n).to(dtype).add_(5)  # no zeros, so zeroed entries are the pruned ones
        y = x.clone()
        kept = ops.prune_(x, ratio, mode="random", seed=3)
        assert kept == int((x != 0).sum())
        sigma = math.sqrt(n * ratio * (1 - ratio))
        assert abs(kept - n * (1 - ratio)) < 5 * sigma
        threads(1)
        ops.prune_(y, ratio, mode="random", seed=3)
        assert torch.equal(x, y)

    def test_reset_mode(self):
        x = torch.randn(10)
        assert ops.prune_(x, 0.5, mode="reset") == 0
        assert bool((x == 0).all())

    @pytest.mark.parametrize("mode", ["magnitude", "random"])
    def test_opcheck(self, mode):
        x = torch.randn(77)
        torch.library.opcheck(torch.ops.relora.prune_.default, (x, 0.9, mode, 1, 0))

    def test_bad_input(self):
        x = torch.randn(10, 10)
        for ratio in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match="ratio must be a finite number in \\[0.0, 1.0\\]"):
                ops.prune_(x, ratio)
        with pytest.raises(ValueError, match="mode must be"):
            ops.prune_(x, 0.5, mode="top")
        with pytest.raises(ValueError, match="needs a seed"):
            ops.prune_(x, 0.5, mode="random")
        with pytest.raises(ValueError, match="x must be contiguous"):
            ops.prune_(x.t(), 0.5)
        with pytest.raises(TypeError, match="x must be float32"):
            ops.prune_(x.long(), 0.5)
        with pytest.raises(TypeError, match="ratio must be a real number"):
            ops.prune_(x, None)


# ------------------------------------------------------------------------------------------------
# the portable (ATen) implementations used on GPUs, checked against the C kernels on CPU


class TestPortable:
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_reset_matches_kernel(self, dtype):
        A1, A2 = torch.empty(33, 70, dtype=dtype), torch.empty(33, 70, dtype=dtype)
        ops.reset_(A1, torch.empty(0, dtype=dtype), std=0.3, seed=9, offset=5)
        torch.ops.relora_testing.reset_portable_(A2, torch.empty(0, dtype=dtype), 0.3, 9, 5)
        # Same Philox words; log/cos/sin of two libraries may differ in the last bit.
        assert_close(A1, A2, rtol=2 * torch.finfo(dtype).eps, atol=1e-7)
        assert (A1 != A2).float().mean() < 0.01

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("mode", ["magnitude", "random"])
    def test_prune_matches_kernel(self, dtype, mode):
        x1 = sample_prune(5000, dtype, seed=1)
        x2 = x1.clone()
        x1[17] = float("nan")
        x2[17] = float("nan")
        k1 = ops.prune_(x1, 0.95, mode=mode, seed=4, offset=2)
        k2 = int(torch.ops.relora_testing.prune_portable_(x2, 0.95, mode, 4, 2))
        assert k1 == k2
        assert torch.equal(x1.view(torch.uint8), x2.view(torch.uint8))

    @pytest.mark.parametrize("wdtype", DTYPES)
    @pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
    def test_merge_matches_kernel(self, wdtype, rounding):
        W1, A, B = sample_merge(45, 77, 5, wdtype, torch.bfloat16)
        W2 = W1.clone()
        ops.merge_(W1, A, B, 0.2, rounding=rounding, seed=8)
        torch.ops.relora_testing.merge_portable_(W2, A, B, 0.2, rounding, 8)
        # fp32 sums in another order: the last fp32 bit differs, which for a 16-bit W changes
        # the rounding only near ties (or, stochastically, near a random threshold).
        assert_close(W1, W2, rtol=2 * torch.finfo(wdtype).eps, atol=1e-6)
        if wdtype != torch.float32:
            assert (W1 != W2).float().mean().item() < 0.01

    def test_merge_refuses_nonfinite(self):
        W, A, B = sample_merge(5, 6, 2, torch.float32, torch.float32)
        before = W.clone()
        A[0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN or Inf"):
            torch.ops.relora_testing.merge_portable_(W, A, B, 1.0, "nearest", 0)
        assert torch.equal(W, before)


def test_package_exports_ops():
    assert relora_ext.ops is ops
    assert {"merge_", "reset_", "prune_"} <= set(ops.__all__)


# ------------------------------------------------------------------------------------------------
# CUDA: the portable path on a GPU agrees with the C kernels on the CPU (skipped without a GPU)


@requires_cuda
class TestCuda:
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_reset_matches_cpu(self, dtype):
        a_cpu, a_gpu = torch.empty(64, 129, dtype=dtype), torch.empty(64, 129, dtype=dtype,
                                                                     device="cuda")
        ops.reset_(a_cpu, torch.empty(0, dtype=dtype), std=0.1, seed=3, offset=9)
        ops.reset_(a_gpu, torch.empty(0, dtype=dtype, device="cuda"), std=0.1, seed=3, offset=9)
        assert_close(a_gpu.cpu(), a_cpu, rtol=2 * torch.finfo(dtype).eps, atol=1e-7)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("mode", ["magnitude", "random"])
    def test_prune_matches_cpu(self, dtype, mode):
        x = sample_prune(100_003, dtype, seed=2)
        y = x.cuda()
        assert ops.prune_(x, 0.99, mode=mode, seed=1) == ops.prune_(y, 0.99, mode=mode, seed=1)
        assert torch.equal(y.cpu(), x)

    @pytest.mark.parametrize("wdtype", DTYPES)
    def test_merge_one_rounding(self, wdtype):
        W, A, B = sample_merge(300, 500, 16, wdtype, torch.float32, device="cuda")
        exact = reference_merge(W, A, B, 0.1)
        ops.merge_(W, A, B, 0.1)
        terms = exact.abs() + 0.1 * (B.double().abs() @ A.double().abs())
        bound = 0.5 * ulp(exact, wdtype) + 1e-6 * terms + 1e-30
        assert bool(((W.double() - exact).abs() <= bound).all())


# ------------------------------------------------------------------------------------------------
# every instruction-set level this machine can run (csrc/kernels/cpu.h), in one pytest run

LEVELS = list(_C_testing.cpu_capabilities())
ALL_LEVELS = ["default", "avx2", "avx512", "avx512_bf16"]
LEVEL_SHAPES = [(1, 1, 1), (7, 33, 1), (33, 7, 7), (65, 129, 8), (100, 257, 33),  # odd
                (64, 128, 8), (96, 256, 64), (256, 64, 16)]  # round


@pytest.fixture(params=LEVELS)
def cpu_level(request):
    """Run the C kernels at one level for the test, then go back to the level that ran before."""
    saved = relora_ext._C._cpu_capability()
    _C_testing.set_cpu_capability(request.param)
    yield request.param
    _C_testing.set_cpu_capability(saved)


@pytest.fixture(params=["kernel", "blas"])
def merge_path(request):
    """Force merge_'s CPU path (fused kernel, or torch's BLAS + our epilogue) for the test."""
    _C_testing.set_merge_path(request.param)
    yield request.param
    _C_testing.set_merge_path("auto")


def at_level(level, fn):
    saved = relora_ext._C._cpu_capability()
    _C_testing.set_cpu_capability(level)
    try:
        return fn()
    finally:
        _C_testing.set_cpu_capability(saved)


class TestCpuLevels:
    def test_capability(self):
        assert relora_ext.cpu_capability() in LEVELS
        assert LEVELS == ALL_LEVELS[: len(LEVELS)] or LEVELS == ["default"]
        with pytest.raises(ValueError, match="level must be one of"):
            _C_testing.set_cpu_capability("sse9")

    @pytest.mark.skipif(LEVELS == ALL_LEVELS, reason="every level runs on this CPU")
    def test_level_above_cpu_refused(self):
        above = ALL_LEVELS[len(LEVELS)]
        with pytest.raises(ValueError, match="does not support|must be one of"):
            _C_testing.set_cpu_capability(above)
        assert relora_ext.cpu_capability() in LEVELS

    @pytest.mark.parametrize("level", LEVELS + ["bogus"])
    def test_env_var_read_at_import(self, level):
        import os
        import subprocess
        import sys

        env = dict(os.environ, RELORA_CPU_CAPABILITY=level)
        out = subprocess.run([sys.executable, "-c", "import relora_ext; print(relora_ext.cpu_capability())"],
                             env=env, capture_output=True, text=True, check=True)
        if level == "bogus":
            assert out.stdout.strip() == LEVELS[-1]
            assert "RELORA_CPU_CAPABILITY=bogus is not a level" in out.stderr
        else:
            assert out.stdout.strip() == level and out.stderr == ""

    @pytest.mark.parametrize("adtype", DTYPES)
    @pytest.mark.parametrize("wdtype", DTYPES)
    @pytest.mark.parametrize("shape", LEVEL_SHAPES)
    def test_merge_one_rounding(self, cpu_level, merge_path, shape, wdtype, adtype):
        W, A, B = sample_merge(*shape, wdtype, adtype, seed=sum(shape))
        exact = reference_merge(W, A, B, 0.37)
        ops.merge_(W, A, B, 0.37)
        err = (W.double() - exact).abs()
        terms = W.double().abs() + 0.37 * (B.double().abs() @ A.double().abs())
        bound = 0.5 * ulp(exact, wdtype) + 1e-6 * terms + 1e-30
        assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"

    @pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
    def test_merge_rounds_to_nearest_exactly(self, cpu_level, merge_path, wdtype):
        W = torch.randn(37, 67, generator=torch.Generator().manual_seed(1)).to(wdtype)
        A = torch.randint(-8, 8, (1, 67)).float()
        B = torch.randint(-8, 8, (37, 1)).float()
        exact = reference_merge(W, A, B, 2.0 ** -10)
        ops.merge_(W, A, B, 2.0 ** -10)
        assert torch.equal(W, exact.float().to(wdtype))

    @pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
    def test_merge_stochastic(self, cpu_level, merge_path, wdtype, threads):
        u = 2.0 ** (-7 if wdtype == torch.bfloat16 else -10)
        n = 200
        A, B = torch.ones(1, n + 3), torch.full((n, 1), u / 4)
        results = []
        for nt in (1, 2):
            threads(nt)
            W = torch.ones(n, n + 3, dtype=wdtype)
            ops.merge_(W, A, B, 1.0, rounding="stochastic", seed=99)
            results.append(W)
        assert torch.equal(results[0], results[1])
        mean = results[0].double().mean().item()
        sigma = math.sqrt(0.25 * 0.75 / (n * (n + 3))) * u
        assert abs(mean - (1 + u / 4)) < 5 * sigma

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_merge_nonfinite_refused_W_untouched(self, cpu_level, merge_path, bad):
        W, A, B = sample_merge(70, 90, 40, torch.bfloat16, torch.float32)
        before = W.clone()
        B[69, 39] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            ops.merge_(W, A, B, 1.0)
        assert torch.equal(W.view(torch.int16), before.view(torch.int16))

    def test_merge_paths_agree(self, cpu_level):
        # the two paths sum in different orders: at most the last fp32 bit differs
        W1, A, B = sample_merge(300, 520, 64, torch.float32, torch.float32)
        W2 = W1.clone()
        try:
            _C_testing.set_merge_path("kernel")
            ops.merge_(W1, A, B, 0.5)
            _C_testing.set_merge_path("blas")
            ops.merge_(W2, A, B, 0.5)
        finally:
            _C_testing.set_merge_path("auto")
        assert_close(W1, W2, rtol=4e-7, atol=1e-6)

    @pytest.mark.parametrize("scale", [0.125, 2.0 ** -6, -0.5, 1.0, 4.0])
    @pytest.mark.parametrize("shape", [(7, 9, 3), (96, 64, 8), (100, 515, 37)])
    @pytest.mark.parametrize("tiny", [None, "product", "scaled_a", "overflow"])
    def test_merge_fp32_is_W_plus_scale_times_the_kernels_product(self, cpu_level, scale, shape, tiny):
        # For a power-of-two scale the merge is fl32(W + s * P), P the kernel's fp32 product (a merge into
        # zeros at scale 1), bit for bit: whether the level scales A while packing (default, |s| <= 1, every
        # product s*b*a a normal float) or scales the sum in the epilogue (FMA levels, |s| > 1, tiny values)
        out, in_, r = shape
        W, A, B = sample_merge(out, in_, r, torch.float32, torch.float32, seed=r)
        # cases where the default level must not prescale: s * b * a or s * a below the normal range, or
        # a sum that overflows (W + s * inf)
        if tiny == "product":
            A[0, 0], B[0, 0] = 1e-20, 1e-19
        elif tiny == "scaled_a":
            A[0, 0], B[:, 0] = 3 * 2.0 ** -149, 2.0 ** 30
        elif tiny == "overflow":
            A[0, :], B[:, 0] = 2.0 ** 100, 2.0 ** 100
        try:
            _C_testing.set_merge_path("kernel")
            P = torch.zeros(out, in_)
            ops.merge_(P, A, B, 1.0)
            got = W.clone()
            ops.merge_(got, A, B, scale)
        finally:
            _C_testing.set_merge_path("auto")
        assert bool(torch.isfinite(P).all()) or tiny == "overflow"
        assert torch.equal(got, W + scale * P)

    @pytest.mark.parametrize("cbwr", [None, "COMPATIBLE", "SSE4_2", "AVX2"])
    def test_merge_auto_path(self, cbwr):
        # BLAS only at the default level, r >= 32, and only where torch's MKL is free to use AVX
        import os
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
        env["RELORA_CPU_CAPABILITY"] = "default"
        if cbwr is not None:
            env["MKL_CBWR"] = cbwr
        code = "from relora_ext import _C_testing; print([_C_testing.merge_takes_blas(r) for r in (8, 31, 32, 256)])"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        has_avx = os.path.exists("/proc/cpuinfo") and "avx" in open("/proc/cpuinfo").read().split()
        wide = has_avx and cbwr != "COMPATIBLE"  # only COMPATIBLE holds MKL to SSE2 on every x86 CPU
        assert out.stdout.strip() == str([False, False, wide, wide])

    def test_merge_auto_path_kernel_from_avx2_up(self):
        for level in LEVELS[1:]:
            assert not at_level(level, lambda: any(_C_testing.merge_takes_blas(r) for r in (8, 64, 256)))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", [(1, 1), (7, 33), (64, 4099), (256, 1024)])
    def test_reset_against_float64(self, cpu_level, shape, dtype):
        A = torch.full(shape, 7.0, dtype=dtype)
        B = torch.ones(shape[::-1], dtype=dtype)
        ops.reset_(A, B, std=0.5, seed=2 ** 63 + 11, offset=3)
        assert bool((B == 0).all())
        z = 0.5 * reference_normals(2 ** 63 + 11, 3, A.numel()).view(shape)
        # fp32 Box-Muller within 4 ulp of float64, then one rounding into the dtype
        bound = 4 * ulp(z, torch.float32) + 0.5 * ulp(z, dtype) + 1e-30
        assert bool(((A.double() - z).abs() <= bound).all())

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("n", [1, 63, 64, 1000, 65537])
    def test_reset_bit_identical_across_levels(self, n, dtype):
        # the normals are fp32 polynomials with no FMA contraction: the same bits at every level
        draws = []
        for level in LEVELS:
            A = torch.empty(n, dtype=dtype)
            at_level(level, lambda: ops.reset_(A, torch.empty(0, dtype=dtype), std=0.02, seed=5, offset=7))
            draws.append(A.view(torch.int16 if dtype != torch.float32 else torch.int32))
        for d in draws[1:]:
            assert torch.equal(d, draws[0])

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("ratio", [0.0, 0.5, 0.99, 1.0])
    @pytest.mark.parametrize("n", [1, 33, 4099, 70000])
    def test_prune_magnitude(self, cpu_level, n, ratio, dtype):
        x = sample_prune(n, dtype, seed=n)
        x[n // 3] = float("nan")
        expected = reference_prune(x, ratio)
        kept = ops.prune_(x, ratio)
        assert kept == reference_keep_count(n, ratio)
        assert torch.equal(x.double().nan_to_num(7.0), expected.nan_to_num(7.0))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("mode", ["magnitude", "random"])
    def test_prune_bit_identical_across_levels(self, mode, dtype):
        x0 = sample_prune(100_003, dtype, seed=2)
        outs = []
        for level in LEVELS:
            x = x0.clone()
            k = at_level(level, lambda: ops.prune_(x, 0.9, mode=mode, seed=3, offset=1))
            outs.append((k, x.view(torch.uint8)))
        for k, x in outs[1:]:
            assert k == outs[0][0] and torch.equal(x, outs[0][1])
        if mode == "random":  # against the float64 rule: kept iff word < floor(0.1 * 2^32)
            import numpy as np

            keep = torch.from_numpy(philox_words(3, 1, x0.numel()) < np.uint64(math.floor(0.1 * 2 ** 32)))
            assert torch.equal(outs[0][1].view(dtype), torch.where(keep, x0, torch.zeros_like(x0)))


def test_portable_kernels_refuse_what_the_cpu_kernels_refuse():
    # the portable implementations run on CUDA and other devices; the test-only ops reach them on CPU
    T = torch.ops.relora_testing
    W, B = torch.ones(8, 1 << 10), torch.ones(8, 2)
    W0 = W.clone()
    with pytest.raises(ValueError, match="merge_: W overlaps A in memory"):
        T.merge_portable_(W, W[:2], B, 1.0, "nearest", 0)
    for scale in (math.nan, math.inf, 1e39):
        with pytest.raises(ValueError, match="merge_: scale must be finite"):
            T.merge_portable_(W, torch.randn(2, 1 << 10), B, scale, "nearest", 0)
    assert torch.equal(W, W0)
    a = torch.zeros(10)
    with pytest.raises(ValueError, match="reset_: B overlaps A in memory"):
        T.reset_portable_(a, a, 1.0, 0, 0)
    with pytest.raises(ValueError, match="reset_: B overlaps A in memory"):
        T.reset_portable_(a[:5], a[4:], 1.0, 0, 0)   # partial overlap
    b = torch.ones(3)
    with pytest.raises(ValueError, match="reset_: std must be a finite number in"):
        T.reset_portable_(torch.empty(10), b, 1e39, 0, 0)
    assert torch.equal(a, torch.zeros(10)) and torch.equal(b, torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reset_std_is_bounded_so_that_A_stays_finite(dtype):
    A, B = torch.empty(1000, dtype=dtype), torch.ones(3, dtype=dtype)
    limit = ops.reset_std_max(dtype)  # finfo.max / 6, to float32 precision (the kernels take std as float32)
    with pytest.raises(ValueError, match="reset_: std must be a finite number"):
        ops.reset_(A, B, std=limit * 1.01, seed=0)
    assert torch.equal(B, torch.ones(3, dtype=dtype))
    ops.reset_(A, B, std=limit, seed=0)
    assert bool(torch.isfinite(A).all())


def test_an_expanded_W_is_refused_with_the_strides_the_user_passed():
    W = torch.randn(6, 1).expand(6, 5)
    with pytest.raises(ValueError, match=r"merge_: W is written in place but its elements overlap .*strides \(1, 0\)"):
        ops.merge_(W, torch.randn(2, 5), torch.randn(6, 2), 1.0)


# ------------------------------------------------------------------------------------------------
# issue 20: refusals change nothing, the rules are the kernels' own, merging draws no random numbers


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reset_std_bound_is_the_kernels_one_on_every_path(dtype):
    """One rule (csrc/kernels/common.c reset_std_max): the wrapper, the operator called directly, and the
    portable implementation refuse the same std, and change nothing when they do."""
    limit = ops.reset_std_max(dtype)
    assert limit == pytest.approx(torch.finfo(dtype).max / 6, rel=1e-6)
    too_big = limit * 1.01
    for call in (lambda A, B: ops.reset_(A, B, std=too_big, seed=0),
                 lambda A, B: torch.ops.relora.reset_(A, B, too_big, 0, 0),
                 lambda A, B: torch.ops.relora_testing.reset_portable_(A, B, too_big, 0, 0)):
        A, B = torch.full((64,), 2.0, dtype=dtype), torch.ones(3, dtype=dtype)
        with pytest.raises(ValueError, match="reset_: std must be a finite number in"):
            call(A, B)
        assert bool((A == 2).all()) and bool((B == 1).all())
    A, B = torch.empty(64, dtype=dtype), torch.ones(3, dtype=dtype)
    torch.ops.relora.reset_(A, B, limit, 0, 0)
    assert bool(torch.isfinite(A).all())


def test_keep_count_is_the_kernels_rule():
    for n, ratio in [(0, 0.5), (1, 0.99), (7, 0.5), (1000, 0.99), (10_007, 0.99), (3, 1.0), (5, 0.0), (10, 0.3)]:
        assert ops.keep_count(n, ratio) == reference_keep_count(n, ratio)
        x = torch.randn(n)
        assert ops.prune_(x, ratio) == ops.keep_count(n, ratio)
    with pytest.raises(ValueError, match="keep_count: ratio must be a finite number in"):
        ops.keep_count(5, 1.5)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_merge_draws_random_numbers_only_for_stochastic_rounding(rounding):
    W, A, B = sample_merge(8, 6, 2, torch.bfloat16, torch.bfloat16)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    ops.merge_(W, A, B, 0.5, rounding=rounding)
    assert torch.equal(torch.get_rng_state(), before) == (rounding == "nearest")


@pytest.mark.parametrize("name", ["merge_", "reset_", "prune_", "uniform_"])
def test_every_public_op_compiles_with_fullgraph(name):
    """torch.compile(fullgraph=True) of each op of ops.__all__ with its default arguments: same result as eager."""
    def args():
        g = torch.Generator().manual_seed(0)
        W, A, B = torch.randn(9, 7, generator=g), torch.randn(3, 7, generator=g), torch.randn(9, 3, generator=g)
        return {"merge_": (lambda W, A, B: ops.merge_(W, A, B, 0.5), (W, A, B)),
                "reset_": (lambda A, B: ops.reset_(A, B, std=0.1, seed=1), (A, B)),
                "prune_": (lambda x: ops.prune_(x, 0.5), (W,)),
                "uniform_": (lambda x: ops.uniform_(x, seed=1), (W,))}[name]
    fn, eager = args()
    fn(*eager)
    fn, compiled = args()
    torch._dynamo.reset()
    torch.compile(fn, fullgraph=True)(*compiled)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)
    assert set(ops.__all__) - {"FLOAT_DTYPES", "keep_count", "reset_std_max"} == {"merge_", "reset_", "prune_", "uniform_"}


def test_huge_scale_is_a_value_error_naming_it():
    W = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="merge_: scale must be a finite number .* got an int of 401 digits"):
        ops.merge_(W, torch.ones(2, 3), torch.ones(4, 2), 10 ** 400)
    assert torch.equal(W, torch.zeros(4, 3))


def test_overlap_refused_by_the_operators_names_both_tensors():
    """Called directly (as torch.compile does, past the wrapper's check), the CPU operators say which tensor overlaps which."""
    W, B = torch.ones(8, 16), torch.ones(8, 2)
    with pytest.raises(ValueError, match="merge_: W overlaps A in memory"):
        torch.ops.relora.merge_(W, W[:2], B, 1.0, "nearest", 0)
    with pytest.raises(ValueError, match="merge_: W overlaps B in memory"):
        torch.ops.relora.merge_(W, torch.ones(2, 16), W[:, :2], 1.0, "nearest", 0)
    assert torch.equal(W, torch.ones(8, 16))
    a = torch.ones(10)
    with pytest.raises(ValueError, match="reset_: B overlaps A in memory"):
        torch.ops.relora.reset_(a[:5], a[4:], 1.0, 0, 0)
    assert torch.equal(a, torch.ones(10))


def test_test_only_entry_points_are_not_in_the_installed_module():
    import subprocess
    import sys

    code = ("import torch, relora_ext; from relora_ext import _C; "
            "print(sorted(n for n in dir(_C) if not n.startswith('__')), hasattr(torch.ops.relora_testing, 'merge_portable_'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "False"  # relora_testing is registered only by relora_ext._C_testing
    assert not any(n in " ".join(out) for n in ("set_cpu_capability", "merge_path", "merge_takes_blas",
                                                "cpu_capabilities"))


class TestSSTRenormalize:
    """relora::sst_renormalize_ (csrc/ops/sst_linear.cpp): every layer checked before any changes."""

    @staticmethod
    def layer(out=6, in_=5, m=5, r=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(out, r, generator=g), torch.randn(in_, r, generator=g), torch.rand(m, generator=g) + 1,
                torch.tensor([0, 3]))

    def call(self, layers):
        Ua, Va, s, S = zip(*layers)
        torch.ops.relora.sst_renormalize_(list(Ua), list(Va), list(s), list(S))

    def test_a_bad_layer_1_leaves_layer_0_unchanged(self):
        good = self.layer()
        saved = [t.clone() for t in good]
        Ua, Va, s, S = self.layer(seed=1)
        expanded = (torch.randn(6, 1).expand(6, 2), Va, s, S)
        with pytest.raises(ValueError, match="layer 1: U_active is written in place but its elements overlap"):
            self.call([good, expanded])
        for t, t0 in zip(good, saved):
            assert torch.equal(t, t0)

    def test_requires_grad_in_grad_mode_is_refused(self):
        Ua, Va, s, S = self.layer()
        Ua.requires_grad_(True)
        Ua0, Va0, s0 = Ua.detach().clone(), Va.clone(), s.clone()
        with pytest.raises(ValueError, match="layer 0: U_active requires grad .* torch.no_grad"):
            self.call([(Ua, Va, s, S)])
        assert torch.equal(Ua.detach(), Ua0) and torch.equal(Va, Va0) and torch.equal(s, s0)
        with torch.no_grad():
            self.call([(Ua, Va, s, S)])
        assert_close(Ua.detach().norm(dim=0).double(), torch.ones(2, dtype=torch.float64))

    def test_U_active_is_V_active_is_refused_clearly(self):
        t = torch.randn(5, 2)
        s, S = torch.rand(5) + 1, torch.tensor([0, 3])
        t0, s0 = t.clone(), s.clone()
        with pytest.raises(ValueError, match="layer 0: U_active and V_active share memory"):
            torch.ops.relora.sst_renormalize_([t], [t], [s], [S])
        assert torch.equal(t, t0) and torch.equal(s, s0)

    def test_result_against_float64(self):
        layers = [self.layer(seed=i) for i in range(2)]
        ref = []
        for Ua, Va, s, S in layers:
            nu, nv = Ua.double().norm(dim=0), Va.double().norm(dim=0)
            s2 = s.double().clone()
            s2[S] *= nu * nv
            ref.append((Ua.double() / nu, Va.double() / nv, s2))
        self.call(layers)
        for (Ua, Va, s, S), (rU, rV, rs) in zip(layers, ref):
            assert_close(Ua.double(), rU, rtol=1e-6, atol=1e-6)
            assert_close(Va.double(), rV, rtol=1e-6, atol=1e-6)
            assert_close(s.double(), rs, rtol=1e-6, atol=1e-6)


def test_sst_linear_bad_active_names_the_argument_range_and_value():
    g = torch.Generator().manual_seed(0)
    x, U, V, sigma = torch.randn(3, 5, generator=g), torch.randn(6, 5, generator=g), torch.randn(5, 5, generator=g), \
        torch.rand(5, generator=g)
    Ua, Va = torch.randn(6, 2, generator=g), torch.randn(5, 2, generator=g)
    for active in (torch.tensor([1, 7]), torch.tensor([-1, 2])):
        with pytest.raises(IndexError, match=r"sst_linear: active must index sigma's 5 entries \(each in \[0, 5\)\), "
                                             r"got active\[\d\] = (7|-1)"):
            torch.ops.relora.sst_linear(x, U, V, sigma, active, Ua, Va, None)
