"""The LoRA layer: :class:`LoRALinear` (model surgery, :func:`~relora_ext.wrap`/:func:`~relora_ext.unwrap`, is in model.py).

A :class:`LoRALinear` is a drop-in :class:`torch.nn.Linear` whose weight ``W (out, in)`` is frozen and
whose update is carried by two trainable factors ``B (out, r)`` and ``A (r, in)``::

    y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ,        s = alpha / r

:func:`wrap` swaps the linear layers of a model for :class:`LoRALinear` in place; :func:`unwrap` merges
every adapter and puts plain :class:`torch.nn.Linear` layers back, so that the result loads into the
unmodified architecture. The ReLoRA* cycle (merge, reset, prune every ``T`` steps) is run by
:class:`relora_ext.optim.ReLoRAOptimizer`, which calls :meth:`LoRALinear.merge_and_reset_`.

Example::

    >>> import torch, relora_ext
    >>> layer = relora_ext.LoRALinear.from_linear(torch.nn.Linear(32, 64), r=4)
    >>> y = layer(torch.randn(10, 32))                 # (10, 64); lora_A and lora_B train, weight is frozen
    >>> layer.merge_and_reset_(seed=0, offset=0)      # W += s·B·A; B = 0; A redrawn (the output is unchanged)
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import FLOAT_DTYPES, check_float, check_rank
from .adapter import LowRankAdapter

__all__ = ["LoRALinear", "is_conv1d"]

_OP = None


def _lora_linear(x, weight, bias, A, B, scaling: float, x_dropped=None):
    """``x`` ``(*, in)`` -> ``(*, out)``: ``x Wᵀ + b + s (xd Aᵀ) Bᵀ`` (``xd = x_dropped``, or ``x``).

    One call of the native operator ``torch.ops.relora.lora_linear`` (csrc/ops/lora_linear.cpp), whose
    autograd (double backward included) and autocast kernels are registered in C++: no Python
    ``autograd.Function``, no per-call casts or checks in Python. Forward: ``h = xd Aᵀ`` ``(N, r)``;
    ``y = addmm(b, x, Wᵀ)``; ``y += s h Bᵀ`` in place. Saves ``h`` and ``x`` (``xd`` instead with dropout,
    whose own mask is saved by the dropout): no more than PEFT's LoRA layer. ``W`` may be stored in
    another floating dtype than ``x`` (it is then cast for the product; under autocast it is cast to the
    autocast dtype like every other argument, which is no copy when it is stored in that dtype).
    """
    global _OP
    if _OP is None:
        _OP = torch.ops.relora.lora_linear.default
    return _OP(x, weight, bias, A, B, scaling, x_dropped)


class LoRALinear(LowRankAdapter):
    r"""A drop-in :class:`torch.nn.Linear` with a frozen weight and a trainable low-rank update.

    Computes ``y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ`` with ``s = alpha / r``.

    Shapes: input ``(*, in_features)``, output ``(*, out_features)`` (any leading dimensions, like
    :class:`torch.nn.Linear`). Parameters:

    - ``weight`` ``(out_features, in_features)``: frozen (``requires_grad=False``), initialised like
      :class:`torch.nn.Linear` (Kaiming-uniform) when the layer is built from scratch — in ReLoRA* this
      random matrix is the starting point the merged updates accumulate into;
    - ``bias`` ``(out_features,)`` or ``None``: trainable;
    - ``lora_A`` ``(r, in_features)``: trainable, ``N(0, init_std²)`` at init;
    - ``lora_B`` ``(out_features, r)``: trainable, zero at init, so the adapter starts as an exact no-op.

    Args:
        in_features, out_features, bias, device, dtype: as for :class:`torch.nn.Linear`.
        r: rank of the update, ``1 <= r <= min(in_features, out_features)``.
        alpha: scale numerator; ``s = alpha / r``. **Default ``alpha = r``, i.e. ``s = 1``**: the merged
            update is exactly ``B·A``, so the learning rate means what it means for any other parameter
            (no hidden multiplier to retune when ``r`` changes), and the merge adds ``B·A`` without a
            rescaling rounding. PEFT's default differs: a fixed ``lora_alpha = 8`` whatever ``r`` (``s = 8 / r``);
            pass ``alpha=8`` to match it.
        dropout: dropout probability applied to the adapter's input only (the frozen path sees ``x``).
        init_std: standard deviation of ``A`` at init and at every reset. **Default
            ``1 / sqrt(in_features)``** (fan-in): for inputs with unit-variance entries the adapter's hidden
            ``x Aᵀ`` then has unit-variance entries whatever the width, so the gradient of ``B`` (which is
            ``s · (x Aᵀ)ᵀ ∂L/∂y``) has the same scale as that of a fan-in-initialised layer.
        weight_dtype: the dtype the frozen ``weight`` is stored in between merges (``None``: the layer's
            dtype). ``weight_dtype=torch.bfloat16`` on a float32 layer keeps ``lora_A``, ``lora_B`` and
            ``bias`` in float32 (the trained parameters and their optimizer state) and ``W`` in bfloat16:
            half the weight memory, and under bf16 autocast no cast of ``W`` at every step (autocast's
            cast is then no copy). The price is that ``W`` carries bf16 precision: each merge accumulates
            ``s·B·A`` in float32 and rounds once into ``W`` (``rounding="stochastic"`` makes that rounding
            unbiased over cycles), which is what autocast computes with anyway. Outside autocast ``W`` is
            cast to the input's dtype in the product. Memory: ``2·out·in`` bytes less per layer (LLaMA-130M
            shape, r = 64: 162 MiB of 1245 MiB of weights + grads + AdamW state), plus no bf16 copy of ``W``
            made and held for backward at every step under autocast. Accuracy: ``benchmarks/RESULTS.md``,
            sections train_lm_bf16w (fp32 compute: bf16 storage costs some loss) and bench_step_cuda.

    Example::

        >>> layer = LoRALinear(128, 256, r=8)
        >>> y = layer(torch.randn(4, 10, 128))            # (4, 10, 256)
        >>> [n for n, p in layer.named_parameters() if p.requires_grad]
        ['bias', 'lora_A', 'lora_B']
        >>> layer.merge_and_reset_(seed=0, offset=0)      # W += s·B·A; B = 0; A redrawn
    """

    __constants__ = ["in_features", "out_features", "r"]

    in_features: int
    out_features: int
    r: int

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        r: int,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        init_std: Optional[float] = None,
        weight_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"LoRALinear: {name} must be a positive int, got {v!r}")
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._adopt(base.weight, base.bias, r=r, alpha=alpha, dropout=dropout, init_std=init_std,
                    weight_dtype=weight_dtype, where="LoRALinear")
        self._weight_requires_grad = True
        self._base_cls = None  # the module type unwrap() gives back: nn.Linear, or transformers' Conv1D

    # -- construction helpers --------------------------------------------------------------------

    def _adopt(self, weight: nn.Parameter, bias: Optional[nn.Parameter], *, r, alpha, dropout, init_std,
               where: str, weight_dtype: Optional[torch.dtype] = None) -> None:
        out_features, in_features = weight.shape
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.r = check_rank(where, r, self.in_features, self.out_features)
        self.alpha = float(self.r) if alpha is None else alpha  # validated by the property (float32 range)
        p = check_float(where, "dropout", dropout, lo=0.0, hi=1.0, hi_open=True)
        if init_std is None:
            init_std = 1.0 / math.sqrt(self.in_features)
        init_std = self.valid_init_std(where, init_std, weight.dtype)  # before the weight is touched
        if weight_dtype is not None and weight_dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where}: weight_dtype must be None or one of "
                            f"{', '.join(str(d) for d in FLOAT_DTYPES)}, got {weight_dtype!r}")
        if weight_dtype is not None and not weight.dtype.is_floating_point:
            raise TypeError(f"{where}: weight_dtype needs a floating-point weight, got {weight.dtype}")
        factory = {"device": weight.device, "dtype": weight.dtype}  # A and B: the layer's dtype

        self.freeze_(weight, weight_dtype)
        self.weight = weight
        self.bias = bias
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, **factory))
        self.dropout = p
        self.init_std = init_std
        self.reset_lora_parameters()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        init_std: Optional[float] = None,
        weight_dtype: Optional[torch.dtype] = None,
    ) -> "LoRALinear":
        """Build a :class:`LoRALinear` that adopts ``linear``'s ``weight`` and ``bias`` Parameters.

        Nothing is copied: ``result.weight is linear.weight`` (now frozen) and ``result.bias is
        linear.bias``. ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` are created on the weight's device
        with its dtype. Keyword arguments as for :class:`LoRALinear`; with ``weight_dtype`` the adopted
        ``weight`` Parameter keeps its identity but its data is converted to that dtype (e.g.
        ``LoRALinear.from_linear(lin, r=8, weight_dtype=torch.bfloat16)``).

        Example::

            >>> lin = torch.nn.Linear(64, 32)
            >>> lora = LoRALinear.from_linear(lin, r=4)
            >>> lora.weight is lin.weight
            True
        """
        conv1d = is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise TypeError(
                f"LoRALinear.from_linear: linear must be an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        requires_grad = linear.weight.requires_grad
        weight = linear.weight
        if conv1d:  # Conv1D stores (in, out): adopt an (out, in) view of the same memory
            weight = nn.Parameter(linear.weight.detach().t(), requires_grad=requires_grad)
        self._adopt(weight, linear.bias, r=r, alpha=alpha, dropout=dropout, init_std=init_std,
                    weight_dtype=weight_dtype, where="LoRALinear.from_linear")
        self._weight_requires_grad = requires_grad
        self._base_cls = type(linear) if conv1d else None
        return self

    def reset_parameters(self) -> None:
        """Re-initialise everything as a fresh layer: ``weight``/``bias`` like :class:`torch.nn.Linear`
        (Kaiming-uniform), then the adapter (:meth:`reset_lora_parameters`). Example: ``layer.reset_parameters()``."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
                nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """Re-initialise the adapter with the module RNG: ``A ~ N(0, init_std²)``, ``B = 0``.

        Uses :mod:`torch`'s global generator (like :meth:`torch.nn.Linear.reset_parameters`); the resets
        done during training use :meth:`merge_and_reset_`'s counter-based draw instead.
        """
        with torch.no_grad():
            nn.init.normal_(self.lora_A, mean=0.0, std=self.init_std)
            self.lora_B.zero_()

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(*, in_features)`` -> ``(*, out_features)``.

        One call of the native operator ``torch.ops.relora.lora_linear`` (see :func:`_lora_linear`). With
        dropout in training, the adapter reads ``F.dropout(x)`` and the frozen path reads ``x``.
        """
        xd = F.dropout(x, self.dropout, True) if self.dropout > 0 and self.training else None
        return _lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, xd)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        s += f", r={self.r}, alpha={self.alpha}"
        return s + f", dropout={self.dropout}"

    # -- ReLoRA* operations -----------------------------------------------------------------------

    def merge_operands(self, weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weight, lora_A, lora_B)``: the merge is ``W += s · B @ A``; the reset draws ``A`` and zeroes ``B``
        (:meth:`merge_and_reset_`)."""
        return self.weight if weight is None else weight, self.lora_A, self.lora_B

    def base_state_dict(self) -> Dict[str, torch.Tensor]:
        """``weight`` merged, in the dtype and layout :meth:`to_base` gives (``(in, out)`` for a ``Conv1D``),
        and ``bias``."""
        self.refuse_if_unfit("merged_state_dict")
        w = self.merged_weight().to(self.lora_A.dtype)
        sd = {"weight": w.t().contiguous() if self._base_cls is not None else w}
        if self.bias is not None:
            sd["bias"] = self.bias.detach()
        return sd

    @torch.no_grad()
    def to_base(self) -> nn.Module:
        """:meth:`to_linear`, or for a layer adopted from a transformers ``Conv1D`` that ``Conv1D`` again (its
        ``(in, out)`` weight Parameter over the same memory, merged). Used by :func:`unwrap`."""
        lin = self.to_linear()
        if getattr(self, "_base_cls", None) is None:
            return lin
        conv = self._base_cls.__new__(self._base_cls)
        nn.Module.__init__(conv)
        conv.nf, conv.nx = self.out_features, self.in_features
        conv.weight = nn.Parameter(lin.weight.detach().t(), requires_grad=lin.weight.requires_grad)
        conv.bias = lin.bias
        conv.train(self.training)
        return conv

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """Merge the adapter and return a plain :class:`torch.nn.Linear` holding the merged weight.

        The returned layer shares this layer's ``weight`` and ``bias`` Parameters (no copy): the adapter is
        merged into ``weight`` in place, ``lora_B`` is zeroed (so this layer still computes the same
        function) and ``weight.requires_grad`` is restored to what it was before wrapping (``True`` for a
        layer built from scratch).

        Example::

            >>> layer = LoRALinear(16, 8, r=2)
            >>> lin = layer.to_linear()
            >>> type(lin).__name__, lin.weight is layer.weight
            ('Linear', True)
        """
        self.refuse_if_unfit("LoRALinear.to_linear")
        self.merge_()
        self.lora_B.zero_()
        if self.weight.dtype != self.lora_A.dtype:  # kept in another dtype (weight_dtype): the layer's again
            self.weight.data = self.weight.data.to(self.lora_A.dtype)
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features = self.in_features
        lin.out_features = self.out_features
        self.weight.requires_grad_(self._weight_requires_grad)
        lin.weight = self.weight
        lin.bias = self.bias
        lin.train(self.training)
        return lin


def is_conv1d(mod: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's projections): a linear layer with its weight stored ``(in, out)``."""
    cls = type(mod)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
