"""Property tests: over random shapes, strides and dtypes the ops either give the reference result
or raise a clear TypeError/ValueError; never a crash, never a silent wrong answer."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relora_ext import ops
from _reference import reference_keep_count, reference_merge, reference_prune, ulp

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32])
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `t` laid out contiguously, transposed, or with padded rows."""
    if layout == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if layout == "padded" and t.dim() == 2:
        big = torch.zeros(t.shape[0], t.shape[1] + 3, dtype=t.dtype)
        big[:, : t.shape[1]] = t
        return big[:, : t.shape[1]]
    if layout == "every_other" and t.dim() == 2:
        big = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        big[:, ::2] = t
        return big[:, ::2]
    return t


LAYOUTS = st.sampled_from(["contiguous", "transposed", "padded", "every_other"])


@SETTINGS
@given(out=st.integers(0, 40), in_=st.integers(0, 40), r=st.integers(0, 6), wdtype=DTYPES,
       adtype=DTYPES, layout=LAYOUTS, alayout=LAYOUTS, seed=st.integers(0, 2 ** 32))
def test_merge(out, in_, r, wdtype, adtype, layout, alayout, seed):
    g = torch.Generator().manual_seed(seed)
    W = strided(torch.randn(out, in_, generator=g).to(wdtype), layout)
    A = strided(torch.randn(r, in_, generator=g).to(adtype), alayout)
    B = torch.randn(out, r, generator=g).to(adtype)
    before = W.clone()
    try:
        ops.merge_(W, A, B, 0.5)
    except (TypeError, ValueError) as e:
        assert "merge_:" in str(e)
        assert torch.equal(W, before)
        return
    assert wdtype in ops.FLOAT_DTYPES and adtype in ops.FLOAT_DTYPES and r >= 1
    assert layout != "every_other" or out <= 1 or in_ <= 1
    exact = reference_merge(before, A, B, 0.5)
    terms = before.double().abs() + 0.5 * (B.double().abs() @ A.double().abs())
    bound = 0.5 * ulp(exact, wdtype) + 1e-6 * terms + 1e-30
    assert bool(((W.double() - exact).abs() <= bound).all())


@SETTINGS
@given(n=st.integers(0, 3000), ratio=st.floats(-0.5, 1.5), dtype=DTYPES, layout=LAYOUTS,
       seed=st.integers(0, 2 ** 32), levels=st.integers(1, 50))
def test_prune(n, ratio, dtype, layout, seed, levels):
    g = torch.Generator().manual_seed(seed)
    rows = max(1, int(math.sqrt(n)))
    x = torch.randint(-levels, levels + 1, (rows, max(1, n // rows)), generator=g) / levels
    x = strided(x.to(dtype), layout)
    before = x.clone()
    try:
        kept = ops.prune_(x, ratio)
    except (TypeError, ValueError) as e:
        assert "prune_:" in str(e)
        assert torch.equal(x, before)
        return
    assert 0 <= ratio <= 1 and dtype in ops.FLOAT_DTYPES and x.is_contiguous()
    assert kept == reference_keep_count(x.numel(), ratio)
    assert torch.equal(x.double(), reference_prune(before, ratio))
