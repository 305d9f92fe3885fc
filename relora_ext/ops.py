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

import math
import numbers

import torch

__all__ = ["merge_", "reset_", "prune_", "FLOAT_DTYPES"]

#: dtypes the kernels accept for every tensor argument.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_U64 = 1 << 64
_F32_MAX = torch.finfo(torch.float32).max  # scale and std reach the kernels as float32


# ------------------------------------------------------------------------------------------------
# argument checks


def _tensor(fn: str, name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _writable(fn: str, name: str, t: torch.Tensor) -> None:
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{fn}: {name} requires grad and would be written in place; "
            f"call it under torch.no_grad() (got {name}.requires_grad=True with grad mode on)")


def _contiguous(fn: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{fn}: {name} must be contiguous, got shape {tuple(t.shape)} with strides {t.stride()}")


def _same_device(fn: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        given = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{fn}: tensors must be on one device, got {given}")


def _disjoint(fn: str, written: str, a: torch.Tensor, other: str, b: torch.Tensor) -> None:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return  # meta tensors have no memory (every one sits at address 0)
    if torch.compiler.is_compiling():
        return  # storage addresses are not traceable; the kernels refuse overlap themselves
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + sum((s - 1) * st for s, st in zip(a.shape, a.stride())) * a.element_size()
    b1 = b0 + sum((s - 1) * st for s, st in zip(b.shape, b.stride())) * b.element_size()
    if a0 <= b1 and b0 <= a1:
        raise ValueError(f"{fn}: {written} must not overlap {other} in memory")


def _real(fn: str, name: str, v, *, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(v).__name__}")
    v = float(v)
    bounds_ok = (lo is None or v >= lo) and (hi is None or v <= hi)
    if not math.isfinite(v) or not bounds_ok:
        want = "a finite number" if lo is None else (
            f"a number >= {lo}" if hi is None else f"a number in [{lo}, {hi}]")
        raise ValueError(f"{fn}: {name} must be {want}, got {v}")
    return v


def _u64(fn: str, name: str, v) -> int:
    """A Python int in [0, 2**64), passed to the op as the int64 with the same bits."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
    v = int(v)
    if not 0 <= v < _U64:
        raise ValueError(f"{fn}: {name} must be in [0, 2**64), got {v}")
    return v - _U64 if v >= 1 << 63 else v


def _random_seed() -> int:
    """A seed drawn from torch's default generator, so that torch.manual_seed governs it."""
    return int(torch.randint(0, 1 << 62, (), dtype=torch.int64))


# ------------------------------------------------------------------------------------------------
# the operators


def merge_(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, *,
           rounding: str = "nearest", seed: int | None = None) -> None:
    """Merge a LoRA pair into its weight, in place: ``W += scale * B @ A``.

    Shapes: ``W (out, in)``, ``A (r, in)``, ``B (out, r)``, ``r >= 1``. ``W`` is float32, bfloat16
    or float16; ``A`` and ``B`` share one of those dtypes. Each ``W[i, j]`` gets
    ``scale * sum_k B[i, k] A[k, j]`` accumulated in float32 and is rounded into ``W``'s dtype once,
    to nearest-even (``rounding="nearest"``) or stochastically (``rounding="stochastic"``, unbiased;
    random bits from ``seed``, drawn from torch's generator when ``None``). If ``A`` or ``B`` holds
    NaN or Inf a ``ValueError`` is raised and ``W`` is left unchanged. ``W`` may have padded rows
    or be a transpose; no temporary the size of ``W`` is made on CPU.

    Example::

        >>> W = torch.zeros(4, 3); A = torch.ones(2, 3); B = torch.ones(4, 2)
        >>> merge_(W, A, B, 0.5); W[0]
        tensor([1., 1., 1.])
    """
    fn = "merge_"
    _tensor(fn, "W", W, 2)
    _tensor(fn, "A", A, 2)
    _tensor(fn, "B", B, 2)
    if A.dtype != B.dtype:
        raise TypeError(f"{fn}: A and B must share a dtype, got A {A.dtype} and B {B.dtype}")
    out, in_ = W.shape
    r = A.shape[0]
    if r < 1:
        raise ValueError(f"{fn}: rank r = A.shape[0] must be >= 1, got A of shape {tuple(A.shape)}")
    if tuple(A.shape) != (r, in_) or tuple(B.shape) != (out, r):
        raise ValueError(
            f"{fn}: expected W (out, in), A (r, in), B (out, r); got W {tuple(W.shape)}, "
            f"A {tuple(A.shape)}, B {tuple(B.shape)}")
    _same_device(fn, W=W, A=A, B=B)
    _writable(fn, "W", W)
    _disjoint(fn, "W", W, "A", A)
    _disjoint(fn, "W", W, "B", B)
    scale = _real(fn, "scale", scale, lo=-_F32_MAX, hi=_F32_MAX)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"{fn}: rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    seed = _u64(fn, "seed", _random_seed() if seed is None else seed)
    if W.stride(-1) != 1 and W.stride(0) == 1 and out > 1:
        # A transposed W (in, out) in memory: merge W.T += scale * A.T @ B.T instead.
        W, A, B = W.t(), B.t(), A.t()
    elif W.stride(-1) != 1 and in_ > 1:
        raise ValueError(
            f"{fn}: W must have unit stride along one dimension, got strides {W.stride()}")
    with torch.no_grad():
        torch.ops.relora.merge_(W, A, B, scale, rounding, seed)


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
    _tensor(fn, "A", A)
    _tensor(fn, "B", B)
    if A.dtype != B.dtype:
        raise TypeError(f"{fn}: A and B must share a dtype, got A {A.dtype} and B {B.dtype}")
    _same_device(fn, A=A, B=B)
    for name, t in (("A", A), ("B", B)):
        _contiguous(fn, name, t)
        _writable(fn, name, t)
    _disjoint(fn, "A", A, "B", B)
    std = _real(fn, "std", std, lo=0.0, hi=_F32_MAX)
    seed, offset = _u64(fn, "seed", seed), _u64(fn, "offset", offset)
    with torch.no_grad():
        torch.ops.relora.reset_(A, B, std, seed, offset)


def prune_(x: torch.Tensor, ratio: float, *, mode: str = "magnitude", seed: int | None = None,
           offset: int = 0) -> int:
    """Prune a tensor in place, keeping a ``1 - ratio`` share of its entries; returns the count kept.

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
    _tensor(fn, "x", x)
    _contiguous(fn, "x", x)
    _writable(fn, "x", x)
    ratio = _real(fn, "ratio", ratio, lo=0.0, hi=1.0)
    if mode not in ("magnitude", "random", "reset"):
        raise ValueError(f"{fn}: mode must be 'magnitude', 'random' or 'reset', got {mode!r}")
    if mode == "random" and seed is None:
        raise ValueError(f"{fn}: mode='random' needs a seed, got seed=None")
    seed = _u64(fn, "seed", 0 if seed is None else seed)
    offset = _u64(fn, "offset", offset)
    with torch.no_grad():
        if mode == "reset":
            x.zero_()
            return 0
        return int(torch.ops.relora.prune_(x, ratio, mode, seed, offset))
