"""Argument validation for the whole package, in one place.

Every check raises :class:`TypeError` (wrong kind of value) or :class:`ValueError` (right kind, wrong
value) with a message that names the caller, the argument, what was expected and what was given. The
native operators repeat only the checks that keep the process safe when they are called directly.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

#: dtypes the native kernels accept for every tensor argument.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

U64 = 1 << 64
#: scale and std reach the kernels as float32.
F32_MAX = torch.finfo(torch.float32).max


class CycleRefused(ValueError):
    """A cycle (or a layer's merge and reset, an unwrap, a checkpoint load) refused before changing
    anything; the message says why. Defined here, at the bottom of the package, so every module can raise it."""


def is_dtensor(t) -> bool:
    """``True`` when ``t`` is a :class:`torch.distributed.tensor.DTensor` (e.g. an FSDP2 parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


# -- plain values -----------------------------------------------------------------------------------


def check_int(where: str, name: str, v, *, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``v`` as an int in ``[lo, hi]`` (bools refused)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int, got {type(v).__name__} ({v!r})")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        want = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
        raise ValueError(f"{where}: {name} must be {want}, got {v}")
    return v


def check_float(where: str, name: str, v, *, lo: float = -math.inf, hi: float = math.inf,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """``v`` as a finite float in the interval given by ``lo``/``hi`` (open ends as flagged)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {type(v).__name__} ({v!r})")
    try:
        f = float(v)
    except OverflowError:  # an int beyond a double's range (10**400)
        f = math.inf if v > 0 else -math.inf
    ok = math.isfinite(f) and (f > lo if lo_open else f >= lo) and (f < hi if hi_open else f <= hi)
    if not ok:
        left = "(" if lo_open or lo == -math.inf else "["
        right = ")" if hi_open or hi == math.inf else "]"
        given = repr(v) if len(repr(v)) <= 40 else f"an int of {len(str(abs(v)))} digits"
        raise ValueError(f"{where}: {name} must be a finite number in {left}{lo}, {hi}{right}, got {given}")
    return f


def check_bool(where: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{where}: {name} must be a bool, got {type(v).__name__} ({v!r})")
    return v


def check_choice(where: str, name: str, v, choices) -> str:
    if v not in choices:
        raise ValueError(f"{where}: {name} must be one of {tuple(choices)}, got {v!r}")
    return v


def check_u64(where: str, name: str, v) -> int:
    """A Python int in ``[0, 2**64)``."""
    v = check_int(where, name, v)
    if not 0 <= v < U64:
        raise ValueError(f"{where}: {name} must be in [0, 2**64), got {v}")
    return v


def as_i64(v: int) -> int:
    """A u64 as the int64 with the same bits (how seeds and offsets cross the operator schema)."""
    return v - U64 if v >= 1 << 63 else v


def check_rank(where: str, r, in_features: int, out_features: int) -> int:
    r = check_int(where, "r", r)
    if not 1 <= r <= min(in_features, out_features):
        raise ValueError(
            f"{where}: r must satisfy 1 <= r <= min(in_features, out_features) = {min(in_features, out_features)} "
            f"(in_features={in_features}, out_features={out_features}), got r={r}")
    return r


# -- tensors ----------------------------------------------------------------------------------------


def storage_key(t: torch.Tensor):
    """What identifies the memory of ``t``: two Parameters over one storage (``dec.weight =
    nn.Parameter(enc.weight.t())``) are tied as surely as one Parameter used twice."""
    if t.device.type == "meta" or t.numel() == 0:
        return ("id", id(t))
    return (t.device, t.untyped_storage().data_ptr())


def check_tensor(where: str, name: str, t, ndim: Optional[int] = None) -> None:
    """A float32/bfloat16/float16 tensor, of ``ndim`` dimensions if given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{where}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_writable(where: str, name: str, t: torch.Tensor) -> None:
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{where}: {name} requires grad and would be written in place; call it under torch.no_grad() "
            f"(got {name}.requires_grad=True with grad mode on)")
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        raise ValueError(f"{where}: {name} is written in place but its elements overlap (shape {tuple(t.shape)}, "
                         f"strides {t.stride()}: an expanded view?); pass a tensor with its own memory")


def check_contiguous(where: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{where}: {name} must be contiguous, got shape {tuple(t.shape)} with strides {t.stride()}")


def check_same_device(where: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        given = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{where}: tensors must be on one device, got {given}")


def check_disjoint(where: str, written: str, a: torch.Tensor, other: str, b: torch.Tensor) -> None:
    """``a`` (written in place) and ``b`` must not share memory."""
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
        raise ValueError(f"{where}: {written} must not overlap {other} in memory")
