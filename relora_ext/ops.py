"""The native ReLoRA* operators: merge, reset and prune, in place on PyTorch tensors.

Each wrapper checks its arguments (raising ``TypeError``/``ValueError`` that name the argument, the
expected and the given value) and then calls ``torch.ops.relora.*``: the C kernels on CPU, a
portable ATen implementation on every other device. Shapes: ``W (out, in)``, ``A (r, in)``,
``B (out, r)``.

Random draws (reset of ``A``, random pruning, stochastic rounding) come from Philox4x32-10 keyed by
a 64-bit ``seed`` and addressed by a 64-bit ``offset`` and the element index, so they are the same
for every thread count, on every machine, and on every data-parallel rank given the same seed.
"""

from __future__ import annotations

import torch

from . import _C
from ._checks import (F32_MAX, FLOAT_DTYPES, as_i64, check_choice, check_contiguous, check_disjoint, check_float,
                      check_int, check_same_device, check_tensor, check_u64, check_writable)

__all__ = ["merge_", "reset_", "prune_", "uniform_", "keep_count", "reset_std_max", "FLOAT_DTYPES"]


def _random_seed() -> int:
    """A seed drawn from torch's default generator, so that torch.manual_seed governs it."""
    return int(torch.randint(0, 1 << 62, (), dtype=torch.int64))


# ------------------------------------------------------------------------------------------------
# rules the C kernels hold, asked of them (csrc/kernels/common.c) rather than written again here

_KERNEL_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/kernels/common.h


def keep_count(n: int, ratio: float) -> int:
    """The number of entries magnitude pruning keeps of ``n`` at ``ratio``: ``n - floor(ratio * n)``, with the
    product in double precision (the C kernels' own rule). Example: ``keep_count(1000, 0.99) == 10``."""
    n = check_int("keep_count", "n", n, lo=0, hi=(1 << 63) - 1)
    ratio = check_float("keep_count", "ratio", ratio, lo=0.0, hi=1.0)
    return _C._keep_count(n, ratio)


def reset_std_max(dtype: torch.dtype) -> float:
    """The largest ``std`` :func:`reset_` takes for ``A`` of ``dtype``: the draws are below ``6 * std`` in
    magnitude, so up to this bound every entry of ``A`` stays finite in its dtype (``finfo(dtype).max / 6``).
    Example: ``reset_std_max(torch.float16) == 65504 / 6`` (to float32 precision)."""
    if dtype not in _RESET_STD_MAX:
        raise TypeError(f"reset_std_max: dtype must be float32, bfloat16 or float16, got {dtype}")
    return _RESET_STD_MAX[dtype]


# read once, so that torch.compile traces a dict lookup rather than a call into _C
_RESET_STD_MAX = {dt: _C._reset_std_max(code) for dt, code in _KERNEL_DTYPE_CODES.items()}


# ------------------------------------------------------------------------------------------------
# the operators


def check_merge(fn: str, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                names=("W", "A", "B", "scale")):
    """The rules of :func:`merge_`, checked without writing anything (raises ``TypeError``/``ValueError``
    naming ``fn`` and the arguments by ``names``). Returns ``(scale, W, A, B)`` as the kernel takes them: a
    transposed ``W`` becomes ``W.T += scale * A.T @ B.T``. The kernel checks that ``A`` and ``B`` are finite."""
    nW, nA, nB, ns = names
    check_tensor(fn, nW, W, 2)
    check_tensor(fn, nA, A, 2)
    check_tensor(fn, nB, B, 2)
    if A.dtype != B.dtype:
        raise TypeError(f"{fn}: {nA} and {nB} must share a dtype, got {nA} {A.dtype} and {nB} {B.dtype}")
    out, in_ = W.shape
    r = A.shape[0]
    if r < 1:
        raise ValueError(f"{fn}: rank r = {nA}.shape[0] must be >= 1, got {nA} of shape {tuple(A.shape)}")
    if tuple(A.shape) != (r, in_) or tuple(B.shape) != (out, r):
        raise ValueError(
            f"{fn}: expected {nW} (out, in), {nA} (r, in), {nB} (out, r); got {nW} {tuple(W.shape)}, "
            f"{nA} {tuple(A.shape)}, {nB} {tuple(B.shape)}")
    check_same_device(fn, **{nW: W, nA: A, nB: B})
    check_writable(fn, nW, W)
    check_disjoint(fn, nW, W, nA, A)
    check_disjoint(fn, nW, W, nB, B)
    scale = check_float(fn, ns, scale, lo=-F32_MAX, hi=F32_MAX)
    if W.stride(-1) != 1 and W.stride(0) == 1 and out > 1:
        # A transposed W (in, out) in memory: merge W.T += scale * A.T @ B.T instead.
        W, A, B = W.t(), B.t(), A.t()
    elif W.stride(-1) != 1 and in_ > 1:
        raise ValueError(
            f"{fn}: {nW} must have unit stride along one dimension, got strides {W.stride()}")
    return scale, W, A, B


def merge_(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, *,
           rounding: str = "nearest", seed: int | None = None) -> None:
    """Merge a LoRA pair into its weight, in place: ``W += scale * B @ A``.

    Shapes: ``W (out, in)``, ``A (r, in)``, ``B (out, r)``, ``r >= 1``. ``W`` is float32, bfloat16
    or float16; ``A`` and ``B`` share one of those dtypes. Each ``W[i, j]`` gets
    ``scale * sum_k B[i, k] A[k, j]`` accumulated in float32 and is rounded into ``W``'s dtype once,
    to nearest-even (``rounding="nearest"``) or stochastically (``rounding="stochastic"``, unbiased;
    random bits from ``seed``, drawn from torch's generator when ``None``: only then does ``merge_`` draw
    from it, so a merge to nearest leaves the program's later random numbers as they were). If ``A`` or
    ``B`` holds NaN or Inf a ``ValueError`` is raised and ``W`` is left unchanged. ``W`` may have padded
    rows or be a transpose; no temporary the size of ``W`` is made on CPU.

    Example::

        >>> W = torch.zeros(4, 3); A = torch.ones(2, 3); B = torch.ones(4, 2)
        >>> merge_(W, A, B, 0.5); W[0]
        tensor([1., 1., 1.])
    """
    scale, W, A, B = check_merge("merge_", W, A, B, scale)
    check_choice("merge_", "rounding", rounding, ("nearest", "stochastic"))
    if seed is None:  # round to nearest uses no random bits: draw none (and keep torch.compile free of data)
        seed = _random_seed() if rounding == "stochastic" else 0
    seed = as_i64(check_u64("merge_", "seed", seed))
    with torch.no_grad():
        torch.ops.relora.merge_(W, A, B, scale, rounding, seed)


def check_reset(fn: str, A: torch.Tensor, B: torch.Tensor, std: float, names=("A", "B", "std")) -> float:
    """The rules of :func:`reset_`, checked without writing anything (arguments named by ``names``);
    returns ``std`` as a float."""
    nA, nB, ns = names
    check_tensor(fn, nA, A)
    check_tensor(fn, nB, B)
    if A.dtype != B.dtype:
        raise TypeError(f"{fn}: {nA} and {nB} must share a dtype, got {nA} {A.dtype} and {nB} {B.dtype}")
    check_same_device(fn, **{nA: A, nB: B})
    for name, t in ((nA, A), (nB, B)):
        check_contiguous(fn, name, t)
        check_writable(fn, name, t)
    check_disjoint(fn, nA, A, nB, B)
    return check_float(fn, ns, std, lo=0.0, hi=reset_std_max(A.dtype))


def reset_(A: torch.Tensor, B: torch.Tensor, *, std: float, seed: int, offset: int = 0) -> None:
    """Re-draw a LoRA pair in place: ``B <- 0``, ``A <- std * N(0, 1)``.

    Shapes: any ``A`` and ``B`` (normally ``A (r, in)``, ``B (out, r)``), contiguous, one float dtype.
    Element ``e`` of ``A`` (flat order) takes normal ``e`` of the Philox stream ``(seed, offset)``,
    so the draw depends only on ``(seed, offset)``: not on the thread count, the machine or the rank.
    ``ReLoRAOptimizer`` gives each layer and cycle its own ``offset``.

    Example::

        >>> A = torch.empty(2, 3); B = torch.ones(4, 2)
        >>> reset_(A, B, std=0.02, seed=0, offset=7); bool(B.eq(0).all())
        True
    """
    fn = "reset_"
    std = check_reset(fn, A, B, std)
    seed, offset = as_i64(check_u64(fn, "seed", seed)), as_i64(check_u64(fn, "offset", offset))
    with torch.no_grad():
        torch.ops.relora.reset_(A, B, std, seed, offset)


def prune_(x: torch.Tensor, ratio: float, *, mode: str = "magnitude", seed: int | None = None,
           offset: int = 0) -> int:
    """Prune a tensor in place, keeping a ``1 - ratio`` share of its entries; returns the count kept
    (an int; a 0-dim int64 tensor for a meta ``x`` and under :func:`torch.compile`, where it is not known).

    ``x`` is any contiguous float32, bfloat16 or float16 tensor (``n`` entries), e.g. an Adam
    ``exp_avg``. Modes:

    - ``"magnitude"``: keep exactly ``n - floor(ratio * n)`` entries of largest ``|x|``, ties to the
      lower flat index; NaN counts as the largest magnitude, so a NaN is never silently zeroed.
      O(n) radix selection on CPU, no copy of ``x``; works for any ``n`` (``torch.quantile`` stops
      at 2**24).
    - ``"random"``: keep each entry with probability ``1 - ratio``, from the Philox stream
      ``(seed, offset)``; ``seed`` is required.
    - ``"reset"``: zero everything (returns 0).

    Example::

        >>> x = torch.tensor([0.1, -3.0, 2.0, 0.0])
        >>> prune_(x, 0.5), x
        (2, tensor([ 0., -3.,  2.,  0.]))
    """
    fn = "prune_"
    check_tensor(fn, "x", x)
    check_contiguous(fn, "x", x)
    check_writable(fn, "x", x)
    ratio = check_float(fn, "ratio", ratio, lo=0.0, hi=1.0)
    check_choice(fn, "mode", mode, ("magnitude", "random", "reset"))
    if mode == "random" and seed is None:
        raise ValueError(f"{fn}: mode='random' needs a seed, got seed=None")
    seed = as_i64(check_u64(fn, "seed", 0 if seed is None else seed))
    offset = as_i64(check_u64(fn, "offset", offset))
    with torch.no_grad():
        if mode == "reset":
            x.zero_()
            return 0
        kept = torch.ops.relora.prune_(x, ratio, mode, seed, offset)
    if x.device.type == "meta" or torch.compiler.is_compiling():
        return kept  # the count is data: unknown on meta tensors and while tracing
    return int(kept)


def uniform_(x: torch.Tensor, *, seed: int, offset: int = 0) -> None:
    """Fill a float32 tensor in place with uniforms in ``(0, 1]`` from the Philox stream ``(seed, offset)``.

    Element ``e`` (flat order) takes word ``e`` of the stream: ``u = (⌊w / 2⁸⌋ + 1) · 2⁻²⁴``, computed in
    integers, so it is bit-identical on every device, thread count and rank. SST samples its directions
    with it. Example: ``u = torch.empty(5); uniform_(u, seed=0, offset=3)``.
    """
    fn = "uniform_"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"{fn}: x must be float32, got {x.dtype}")
    check_contiguous(fn, "x", x)
    check_writable(fn, "x", x)
    seed, offset = as_i64(check_u64(fn, "seed", seed)), as_i64(check_u64(fn, "offset", offset))
    with torch.no_grad():
        torch.ops.relora.uniform_(x, seed, offset)


# ------------------------------------------------------------------------------------------------
# relora::lora_linear (csrc/ops/lora_linear.cpp): LoRALinear's forward, with its autograd and autocast
# kernels in C++. Called by relora_ext.lora.LoRALinear.forward; this is its fake (shape) kernel, which
# torch.compile and FakeTensor trace with.


@torch.library.register_fake("relora::lora_linear")
def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scaling, x_dropped=None):
    """Shapes only: ``x (*, in)`` -> ``(*, out)`` in ``x``'s dtype, on ``x``'s device."""
    torch._check(weight.dim() == 2 and lora_A.dim() == 2 and lora_B.dim() == 2,
                 lambda: "lora_linear: weight, lora_A and lora_B must be 2-D")
    torch._check(x.dim() >= 1 and x.shape[-1] == weight.shape[1],
                 lambda: f"lora_linear: x must be (*, in) with in = {weight.shape[1]}, got {tuple(x.shape)}")
    torch._check(lora_A.shape[1] == weight.shape[1] and lora_B.shape[0] == weight.shape[0]
                 and lora_B.shape[1] == lora_A.shape[0],
                 lambda: f"lora_linear: expected lora_A (r, in) and lora_B (out, r) for weight "
                         f"{tuple(weight.shape)}, got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("relora::sst_linear")
def _sst_linear_fake(x, U, V, sigma, active, U_active, V_active, bias=None):
    """Shapes only: ``x (*, in)`` -> ``(*, out)`` with ``out = U.shape[0]`` (csrc/ops/sst_linear.cpp)."""
    torch._check(x.shape[-1] == V.shape[0], lambda: f"sst_linear: x must be (*, {V.shape[0]}), got {tuple(x.shape)}")
    return x.new_empty((*x.shape[:-1], U.shape[0]))
