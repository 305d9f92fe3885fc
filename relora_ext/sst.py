"""SST, Sparse Spectral Training (Zhao et al., arXiv 2405.15481): :class:`SSTLinear` and its periodic work.

A layer keeps its weight as a singular value decomposition, ``W = U diag(Σ) Vᵀ`` with ``U (out, m)``,
``Σ (m,)``, ``V (in, m)``, ``m = min(out, in)``, initialised from the SVD of the layer's weight::

    y = x V diag(Σ) Uᵀ + b

Every step trains all of ``Σ`` (kept non-negative) and ``r`` sampled directions: the active columns
``U[:, S]`` and ``V[:, S]`` live in the Parameters ``U_active (out, r)`` and ``V_active (in, r)``, the only
columns with optimizer state. They take the *enhanced gradient* ``∂L/∂W · Vᵢ`` and ``(∂L/∂W)ᵀ Uᵢ``,
without the ``Σᵢ`` factor of the true gradient (which would starve small singular values), and after every
optimizer step they are renormalised to unit length, their norms moved into ``Σ`` (the function is
unchanged). Each *iteration* (``reset_every`` steps, run by :class:`~relora_ext.optim.ReLoRAOptimizer`
through :mod:`relora_ext.cycle`) writes the active columns back, samples a new set without replacement
with ``p(i) = ½(1/m + Σᵢ/ΣΣ)`` from the counter-based Philox stream (the same on every rank), swaps it in
and clears its optimizer state; each *round* (``⌈m / r⌉`` iterations) first restores orthogonality by a
re-SVD of ``U diag(Σ) Vᵀ`` through :func:`torch.linalg.svd`. The first iteration trains the ``r`` largest
directions.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import _C, ops  # noqa: F401  (_C registers torch.ops.relora.sst_linear)
from ._checks import FLOAT_DTYPES, check_int, check_rank, check_u64, is_dtensor
from .adapter import CycledLayer

__all__ = ["SSTLinear", "renormalize_", "sample_directions", "sample_offset"]

_sst_linear = torch.ops.relora.sst_linear.default

FSDP2_REFUSAL = "SST layers under FSDP2 (DTensor parameters) are not supported yet; train SST with DDP or on one process"
_STREAM_SST = (1 << 62) | (1 << 61)  # beside the reset draws (< 2⁶²) and the prune masks (2⁶² + ...)


def sample_offset(layer_index: int, iteration: int) -> int:
    """Philox offset of the direction sample of layer ``ℓ`` at iteration ``c``: ``2⁶² + 2⁶¹ + ℓ · 2³² + c``
    (``0 ≤ ℓ < 2²⁹``, ``0 ≤ c < 2³²``: each layer's samples stay in their own block of the stream)."""
    layer_index = check_int("sample_offset", "layer_index", layer_index, lo=0, hi=(1 << 29) - 1)
    iteration = check_int("sample_offset", "iteration", iteration, lo=0, hi=(1 << 32) - 1)
    return _STREAM_SST + (layer_index << 32) + iteration


@torch.no_grad()
def sample_directions(sigma: torch.Tensor, r: int, *, seed: int, offset: int) -> torch.Tensor:
    """``r`` of the ``m`` directions, without replacement, with ``p(i) = ½(1/m + Σᵢ/ΣΣ)``; sorted indices.

    Weighted sampling without replacement by exponential races (Efraimidis and Spirakis): direction ``i``
    gets the key ``log(uᵢ) / p(i)`` with ``uᵢ`` the ``i``-th Philox uniform of ``(seed, offset)``, and the ``r``
    largest keys win. The draw depends only on ``Σ`` and ``(seed, offset)``: every rank holding the same ``Σ``
    samples the same set. Example: ``sample_directions(layer.sigma, 8, seed=0, offset=sample_offset(0, 1))``.
    """
    fn = "sample_directions"
    if not isinstance(sigma, torch.Tensor):
        raise TypeError(f"{fn}: sigma must be a torch.Tensor, got {type(sigma).__name__}")
    if sigma.dim() != 1 or sigma.numel() == 0 or not sigma.dtype.is_floating_point:
        raise ValueError(f"{fn}: sigma must be a non-empty 1-D floating-point tensor, got shape "
                         f"{tuple(sigma.shape)} and dtype {sigma.dtype}")
    m = sigma.numel()
    r = check_int(fn, "r", r, lo=1, hi=m)
    check_u64(fn, "seed", seed)
    check_u64(fn, "offset", offset)
    if not bool(torch.isfinite(sigma).all()):
        raise ValueError(f"{fn}: sigma holds non-finite values (NaN/Inf)")
    s = sigma.detach().double().clamp(min=0)
    total = float(s.sum())
    p = 0.5 / m + (0.5 * s / total if total > 0 else 0.5 / m)
    u = torch.empty(m, dtype=torch.float32, device=sigma.device)
    ops.uniform_(u, seed=seed, offset=offset)
    keys = u.double().log() / p
    return torch.topk(keys, r).indices.sort().values


@torch.no_grad()
def renormalize_(layers) -> None:
    """:meth:`SSTLinear.renormalize_` of every layer in ``layers``, in one native call
    (``torch.ops.relora.sst_renormalize_``, csrc/ops/sst_linear.cpp): what ReLoRAOptimizer runs after each step.
    ``layers``: any iterable of :class:`SSTLinear` (a generator too)."""
    layers = list(layers)
    for i, m in enumerate(layers):
        if not isinstance(m, SSTLinear):
            raise TypeError(f"renormalize_: layers must hold SSTLinear modules, got {type(m).__name__} at index {i}")
    if layers:
        torch.ops.relora.sst_renormalize_([m.U_active for m in layers], [m.V_active for m in layers],
                                          [m.sigma for m in layers], [m.active for m in layers])


class SSTLinear(CycledLayer):
    r"""A drop-in :class:`torch.nn.Linear` trained by Sparse Spectral Training (see the module docstring).

    Shapes: input ``(*, in_features)``, output ``(*, out_features)``. ``weight_dtype`` (default: the
    layer's dtype) stores the frozen ``U`` and ``V`` in another dtype, e.g. ``torch.bfloat16``. Parameters: ``sigma (m,)``,
    ``U_active (out, r)``, ``V_active (in, r)``, ``bias (out,)`` (adopted from the linear layer); buffers:
    ``U (out, m)`` and ``V (in, m)`` (the frozen directions; the active columns hold zeros there) and
    ``active (r,)`` (the indices ``S``). Trainable share: ``(r (out + in) + m) / (out · in)``.

    Build it with :meth:`from_linear` (or :func:`relora_ext.wrap` with ``method="sst"``); :meth:`to_linear`
    gives an ``nn.Linear`` with ``W = U diag(Σ) Vᵀ``.

    Example::

        >>> layer = SSTLinear.from_linear(torch.nn.Linear(64, 32), r=8)
        >>> y = layer(torch.randn(5, 64))
        >>> layer.weight_sst().shape
        torch.Size([32, 64])
    """

    cycled = ("U_active", "V_active")  # their state is cleared when a new sample is swapped in
    trained = ("sigma", "U_active", "V_active")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 r: int, weight_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self._adopt(nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype), r, weight_dtype,
                    "SSTLinear")

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int, weight_dtype: Optional[torch.dtype] = None) -> "SSTLinear":
        """The SST layer of ``linear``: the SVD of its weight (computed in float64), its bias Parameter.

        ``weight_dtype`` (default: the layer's dtype) is the dtype of the frozen directions ``U`` and ``V``;
        ``torch.bfloat16`` halves their memory while ``Σ`` and the trained columns keep the layer's dtype
        (the frozen columns are rounded to bf16 when an iteration writes them back).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SSTLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._adopt(linear, r, weight_dtype, "SSTLinear.from_linear")
        return self

    @torch.no_grad()
    def _adopt(self, linear: nn.Linear, r: int, weight_dtype: Optional[torch.dtype], where: str) -> None:
        W = linear.weight.detach()
        if W.device.type != "meta" and W.dtype.is_floating_point and not bool(torch.isfinite(W).all()):
            raise ValueError(f"{where}: the weight holds non-finite values (NaN/Inf); its SVD is undefined")
        if weight_dtype is not None and weight_dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where}: weight_dtype must be None or one of "
                            f"{', '.join(str(d) for d in FLOAT_DTYPES)}, got {weight_dtype!r}")
        if not W.dtype.is_floating_point:
            raise TypeError(f"{where}: the weight must be floating point, got {W.dtype}")
        self.out_features, self.in_features = (int(n) for n in W.shape)
        self.m = min(self.in_features, self.out_features)
        self.r = check_rank(where, r, self.in_features, self.out_features)
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        factory = {"device": W.device, "dtype": W.dtype}
        frozen = {"device": W.device, "dtype": weight_dtype or W.dtype}
        self.register_buffer("U", U.to(**frozen))
        self.register_buffer("V", Vh.t().to(**frozen).contiguous())
        self.register_buffer("active", torch.arange(self.r, device=W.device))
        self.sigma = nn.Parameter(S.to(**factory))
        self.U_active = nn.Parameter(torch.empty(self.out_features, self.r, **factory))
        self.V_active = nn.Parameter(torch.empty(self.in_features, self.r, **factory))
        self.bias = linear.bias
        self._activate(self.active, U, Vh.t())

    # -- forward ---------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(*, in)`` -> ``(*, out)``: one call of the native ``torch.ops.relora.sst_linear``
        (csrc/ops/sst_linear.cpp), whose C++ autograd gives ``U_active``/``V_active`` the enhanced gradient
        and ``x``/``Σ`` the true one; autocast kernels in C++ too."""
        return _sst_linear(x, self.U, self.V, self.sigma, self.active, self.U_active, self.V_active, self.bias)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        s += f", r={self.r}, m={self.m}"
        return s + (f", weight_dtype={self.U.dtype}" if self.U.dtype != self.sigma.dtype else "")

    # -- the weight ------------------------------------------------------------------------------------

    @torch.no_grad()
    def weight_sst(self) -> torch.Tensor:
        """The weight the layer computes with, ``U diag(Σ) Vᵀ`` ``(out, in)``, active columns included."""
        U, V = self.U.to(self.sigma.dtype, copy=True), self.V.to(self.sigma.dtype, copy=True)
        U[:, self.active] = self.U_active
        V[:, self.active] = self.V_active
        return (U * self.sigma) @ V.t()

    def settings(self):
        return {**super().settings(), "method": "sst", "weight_dtype": str(self.U.dtype)}

    def base_state_dict(self):
        """``weight = U diag(Σ) Vᵀ`` and ``bias``, as :meth:`to_linear` gives them."""
        self.refuse_if_unfit("merged_state_dict")
        sd = {"weight": self.weight_sst()}
        if self.bias is not None:
            sd["bias"] = self.bias.detach()
        return sd

    def to_base(self) -> nn.Linear:
        """:meth:`to_linear` (what :func:`relora_ext.unwrap` puts back)."""
        return self.to_linear()

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """An :class:`torch.nn.Linear` holding ``W = U diag(Σ) Vᵀ`` (and this layer's bias Parameter).
        Refused (:class:`relora_ext.cycle.CycleRefused`) if :meth:`check` finds a problem (NaN/Inf, say)."""
        self.refuse_if_unfit("SSTLinear.to_linear")
        lin = nn.Linear(self.in_features, self.out_features, bias=False, device=self.sigma.device,
                        dtype=self.sigma.dtype)
        lin.weight.copy_(self.weight_sst())
        lin.bias = self.bias
        lin.train(self.training)
        return lin

    # -- the periodic work (called by relora_ext.cycle) --------------------------------------------------

    @torch.no_grad()
    def _activate(self, S: torch.Tensor, U: Optional[torch.Tensor] = None, V: Optional[torch.Tensor] = None) -> None:
        """Move the columns ``S`` of ``U`` and ``V`` into the active Parameters (zeros left behind); taken
        from ``U`` and ``V`` if given (an SVD's float64 factors: the buffers may be in a lower ``weight_dtype``)."""
        self.U_active.copy_((self.U if U is None else U)[:, S])
        self.V_active.copy_((self.V if V is None else V)[:, S])
        self.U[:, S] = 0
        self.V[:, S] = 0
        self.active.copy_(S)

    @torch.no_grad()
    def _write_back(self) -> None:
        self.U[:, self.active] = self.U_active.to(self.U.dtype)
        self.V[:, self.active] = self.V_active.to(self.V.dtype)

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Unit-length active columns, their norms moved into ``Σ``; ``Σ ≥ 0`` (the function is unchanged)."""
        renormalize_([self])

    @torch.no_grad()
    def resvd_(self) -> None:
        """Restore orthogonality: ``U, Σ, Vᵀ ← SVD(U diag(Σ) Vᵀ)`` (float64), then activate the top ``r``."""
        U, S, Vh = torch.linalg.svd(self.weight_sst().double(), full_matrices=False)
        self.U.copy_(U)
        self.V.copy_(Vh.t())
        self.sigma.copy_(S)
        self.active.copy_(torch.arange(self.r, device=self.active.device))
        self._activate(self.active, U, Vh.t())

    @torch.no_grad()
    def resample_(self, *, seed: int, offset: int) -> None:
        """Write the active columns back and activate a new sample (see :func:`sample_directions`)."""
        S = sample_directions(self.sigma, self.r, seed=seed, offset=offset)  # checks its arguments first
        self._write_back()
        self._activate(S)

    @property
    def rounds_every(self) -> int:
        """Iterations per round: ``⌈m / r⌉``."""
        return math.ceil(self.m / self.r)

    def check(self) -> Optional[str]:
        """Why an iteration (or :meth:`to_linear`) would be refused, ``None`` if it would not: every tensor of
        the layer is checked (shapes, non-finite values, the active indices) before anything is changed."""
        shapes = {"sigma": (self.m,), "U_active": (self.out_features, self.r), "V_active": (self.in_features, self.r),
                  "U": (self.out_features, self.m), "V": (self.in_features, self.m), "active": (self.r,)}
        for name, shape in shapes.items():
            t = getattr(self, name)
            if is_dtensor(t):
                return FSDP2_REFUSAL
            if t.device.type == "meta":
                return "its tensors are on the meta device"
            if tuple(t.shape) != shape:
                return f"{name} has shape {tuple(t.shape)}, expected {shape}"
            if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
                return f"{name} holds non-finite values (NaN/Inf)"
        a = self.active
        if a.dtype != torch.int64:
            return f"active must be int64, got {a.dtype}"
        if bool(((a < 0) | (a >= self.m)).any()) or a.unique().numel() != self.r:
            return f"active must hold {self.r} distinct indices in [0, {self.m}), got {a.tolist()}"
        return None
