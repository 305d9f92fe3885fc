"""ReLoRA* on quantized frozen weights: bitsandbytes ``Linear4bit`` and ``Linear8bitLt`` bases.

A :class:`QuantizedLoRALinear` keeps the bitsandbytes layer as its frozen path and adds the adapter
beside it::

    y = base(x) + s · (dropout(x) Aᵀ) Bᵀ

Its merge cannot add into the quantized codes, so a cycle dequantizes ``W`` to float32, merges
``W + s·B·A`` there (one float32 rounding), and quantizes the result again with the layer's own settings
(4-bit: quant type, block size, nested statistics; 8-bit: row-wise absmax). The requantization rounds
every entry to the quantization grid again, which loses most of an update that is small against the grid
step: :func:`requantization_error` measures it, and the README reports it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._checks import check_float, check_rank
from .lora import LoRALinear

__all__ = ["QuantizedLoRALinear", "is_quantized", "dequantize", "requantize_", "requantization_error"]


def is_quantized(mod: nn.Module) -> bool:
    """``True`` for a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` layer."""
    return type(mod).__module__.startswith("bitsandbytes") and type(mod).__name__ in ("Linear4bit", "Linear8bitLt")


@torch.no_grad()
def dequantize(mod: nn.Module) -> torch.Tensor:
    """The float32 ``(out, in)`` weight a bitsandbytes layer computes with."""
    import bitsandbytes.functional as BF

    w = mod.weight
    if type(mod).__name__ == "Linear4bit":
        return BF.dequantize_4bit(w.data, w.quant_state).float()
    # int8 codes and row scales: on the weight until the first forward, then on the layer's state
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = getattr(getattr(mod, "state", None), "SCB", None)
    if w.dtype != torch.int8 or scb is None:
        raise ValueError(f"dequantize: the {type(mod).__name__} weight is not quantized yet (move it to its device)")
    return w.data.float() * (scb.float()[:, None] / 127.0)


@torch.no_grad()
def requantize_(mod: nn.Module, W: torch.Tensor) -> None:
    """Replace ``mod``'s quantized weight by ``W`` ``(out, in)`` quantized with the layer's own settings."""
    import bitsandbytes as bnb

    old = mod.weight
    if type(mod).__name__ == "Linear4bit":
        new = bnb.nn.Params4bit(W.to(old.quant_state.dtype), requires_grad=False, quant_type=old.quant_type,
                                blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                quant_storage=old.quant_storage)
    else:
        new = bnb.nn.Int8Params(W.to(torch.float16 if W.is_cuda else torch.float32), requires_grad=False,
                                has_fp16_weights=False)
        mod.state.CB = mod.state.SCB = None  # the layer re-reads codes and scales from the new weight
    mod.weight = new.to(W.device)


@torch.no_grad()
def merge_into_(mod: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
    """``W += scale · B @ A`` on a quantized layer: dequantize, add in float32, quantize again (the rounding
    of the float32 sum is moot: the quantization grid decides)."""
    W = dequantize(mod)
    ops.merge_(W, A, B, scale)
    requantize_(mod, W)


@torch.no_grad()
def requantization_error(mod: nn.Module, delta: torch.Tensor) -> float:
    """How much of an update ``delta`` ``(out, in)`` survives a merge into ``mod``: returns
    ``‖Q(W + Δ) − W − Δ‖_F / ‖Δ‖_F`` (0: kept exactly; 1: as much error as the update itself), without
    changing ``mod``. Example: ``requantization_error(layer.base, s * B @ A)``."""
    import copy

    W = dequantize(mod)
    probe = copy.deepcopy(mod)
    requantize_(probe, W + delta.float())
    return float(torch.linalg.matrix_norm(dequantize(probe) - W - delta.float()) / torch.linalg.matrix_norm(delta))


class QuantizedLoRALinear(LoRALinear):
    """A :class:`~relora_ext.lora.LoRALinear` whose frozen weight is a bitsandbytes quantized layer.

    ``base`` (the ``Linear4bit``/``Linear8bitLt``, bias included) computes the frozen path; ``lora_A``
    ``(r, in)`` and ``lora_B`` ``(out, r)`` are float tensors in the base's compute dtype. ``weight`` reads
    the dequantized float32 weight (a new tensor each time). Built by :func:`relora_ext.wrap`;
    :func:`relora_ext.unwrap` merges and gives the bitsandbytes layer back.
    """

    @classmethod
    def from_quantized(cls, base: nn.Module, *, r: int, alpha: Optional[float] = None, dropout: float = 0.0,
                       init_std: Optional[float] = None) -> "QuantizedLoRALinear":
        where = "QuantizedLoRALinear.from_quantized"
        if not is_quantized(base):
            raise TypeError(f"{where}: base must be a bitsandbytes Linear4bit or Linear8bitLt, got "
                            f"{type(base).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.r = check_rank(where, r, self.in_features, self.out_features)
        self.alpha = float(self.r) if alpha is None else alpha
        self.dropout = check_float(where, "dropout", dropout, lo=0.0, hi=1.0, hi_open=True)
        self._weight_requires_grad = False
        self._base_cls = None
        base.requires_grad_(False)
        self.base = base
        dtype = getattr(base, "compute_dtype", None) or torch.float32
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device, dtype=dtype))
        self.init_std = 1.0 / math.sqrt(self.in_features) if init_std is None else init_std
        self.reset_lora_parameters()
        self.train(base.training)
        return self

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.base)

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        lora = F.linear(F.linear(h.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return self.base(x) + (lora * self.scaling if self.scaling != 1.0 else lora).to(x.dtype)

    def base_state_dict(self):
        raise ValueError("merged_state_dict: a layer with a quantized base "
                         f"({type(self.base).__name__}) has no merged state without requantizing; unwrap the model "
                         "(merging into the quantized weights) and save that instead")

    def merge_operands(self, weight=None):
        """``(None, lora_A, lora_B)``: ``W`` is dequantized only by the merge itself (see :meth:`merge_`)."""
        return None, self.lora_A, self.lora_B

    def merge_(self, *, rounding: str = "nearest", seed: Optional[int] = None) -> None:
        """:func:`merge_into_` the base (``rounding`` is moot: the quantization grid decides)."""
        merge_into_(self.base, self.lora_A, self.lora_B, self.scaling)

    @torch.no_grad()
    def to_base(self) -> nn.Module:
        self.refuse_if_unfit("QuantizedLoRALinear.to_base")
        self.merge_()
        self.lora_B.zero_()
        return self.base

    def to_linear(self) -> nn.Module:
        return self.to_base()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", base={type(self.base).__name__}"
