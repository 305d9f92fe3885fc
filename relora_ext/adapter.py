"""What every layer a ReLoRA* cycle works on shares: :class:`CycledLayer` and :class:`LowRankAdapter`.

A *cycled layer* owns its rules. :meth:`CycledLayer.check` says why its part of a cycle would be refused
(checking only, writing nothing); the cycle (:mod:`relora_ext.cycle`), :func:`relora_ext.unwrap` and
:meth:`LowRankAdapter.merge_and_reset_` all ask it before changing anything, so a refused call changes
nothing. :class:`LowRankAdapter` is the ReLoRA* kind (a frozen base plus ``s · B · A``): it keeps ``alpha``
as the one source of the scale ``s = alpha / r`` and validates ``alpha`` and ``init_std`` when they are set.
Its subclasses say which tensors the merge and the reset take (:meth:`LowRankAdapter.merge_operands`,
:meth:`LowRankAdapter.reset_operands`): :class:`~relora_ext.lora.LoRALinear`,
:class:`~relora_ext.quantized.QuantizedLoRALinear`, :class:`~relora_ext.embedding.LoRAEmbedding`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from . import ops
from ._checks import F32_MAX, FLOAT_DTYPES, CycleRefused, check_choice, check_float, check_u64

__all__ = ["CycledLayer", "LowRankAdapter", "ROUNDINGS"]

ROUNDINGS = ("nearest", "stochastic")


class CycledLayer(nn.Module):
    """A layer a ReLoRA*/SST cycle works on. Subclasses set :attr:`cycled`, :attr:`trained` and
    :attr:`shape_fields` and implement :meth:`check`, :meth:`to_base` and :meth:`base_state_dict`."""

    #: the parameters whose optimizer state a cycle prunes (ReLoRA*) or clears (SST)
    cycled: Tuple[str, ...] = ()
    #: the parameters the wrapped optimizer must hold
    trained: Tuple[str, ...] = ()
    #: the attributes that give the layer's shape (saved by :meth:`settings`)
    shape_fields: Tuple[str, ...] = ("in_features", "out_features")

    def check(self) -> Optional[str]:
        """Why this layer's part of a cycle would be refused, or ``None``; checks only, writes nothing."""
        raise NotImplementedError

    def to_base(self) -> nn.Module:
        """Merge and return the plain module this layer replaced (used by :func:`relora_ext.unwrap`)."""
        raise NotImplementedError

    def base_state_dict(self) -> Dict[str, torch.Tensor]:
        """The ``state_dict()`` of the module :meth:`to_base` would give back (its keys and layout, every
        update merged), computed without changing this layer (used by :func:`relora_ext.merged_state_dict`)."""
        raise NotImplementedError

    def settings(self) -> Dict[str, Any]:
        """What a checkpoint records of this layer and compares on load (the same weights under other settings
        compute another function): its rank and shape, plus what the kind adds."""
        return {"r": self.r, **{k: getattr(self, k) for k in self.shape_fields}}

    def refuse_if_unfit(self, where: str, name: str = "") -> None:
        """Raise :class:`CycleRefused` naming ``where`` and the layer if :meth:`check` finds a problem."""
        problem = self.check()
        if problem is not None:
            at = f" layer {name!r}:" if name else ""
            raise CycleRefused(f"{where}: refused, nothing was changed:{at} {problem}")


class LowRankAdapter(CycledLayer):
    """A frozen base weight plus a trainable ``s · B · A`` (``s = alpha / r``), merged and re-drawn each cycle.

    Subclasses create ``weight``, ``lora_A`` and ``lora_B``, set ``r`` and then ``alpha`` and ``init_std``
    (validated on every assignment), and implement :meth:`merge_operands` and :meth:`reset_operands`.
    """

    cycled = trained = ("lora_A", "lora_B")
    #: what the merge's and the reset's operands are called in messages (see the operand methods)
    merge_names = ("weight", "lora_A", "lora_B", "scaling")
    reset_names = ("lora_A", "lora_B", "init_std")
    r: int

    # -- the settings: one source each, checked when set ----------------------------------------------

    @property
    def alpha(self) -> float:
        """The scale's numerator; ``scaling = alpha / r`` follows it (there is no separate copy to go stale)."""
        return self._alpha

    @alpha.setter
    def alpha(self, value) -> None:
        self._alpha = check_float(type(self).__name__, "alpha", value, lo=0.0, lo_open=True, hi=F32_MAX)

    @property
    def scaling(self) -> float:
        """``s = alpha / r``, read-only: set :attr:`alpha` to change it."""
        return self._alpha / self.r

    @property
    def init_std(self) -> float:
        """Standard deviation of the factor drawn at every reset."""
        return self._init_std

    @init_std.setter
    def init_std(self, value) -> None:
        self._init_std = self.valid_init_std(type(self).__name__, value, self.reset_operands()[0].dtype)

    @staticmethod
    def freeze_(weight: nn.Parameter, weight_dtype: Optional[torch.dtype]) -> None:
        """Freeze an adopted base weight, its storage converted to ``weight_dtype`` if given (the same
        Parameter object: whoever else holds it sees the frozen, converted weight)."""
        weight.requires_grad_(False)
        if weight_dtype is not None and weight.dtype != weight_dtype:
            with torch.no_grad():
                weight.data = weight.data.to(weight_dtype)

    @staticmethod
    def valid_init_std(where: str, value, dtype: torch.dtype) -> float:
        """``value`` as an ``init_std`` for factors of ``dtype``: a reset draws ``|x| < 6·std`` in that dtype
        (:func:`relora_ext.ops.reset_`), so the bound keeps the draw finite."""
        hi = ops.reset_std_max(dtype) if dtype in FLOAT_DTYPES else F32_MAX
        return check_float(where, "init_std", value, lo=0.0, hi=hi)

    # -- what subclasses say ------------------------------------------------------------------------

    def settings(self) -> Dict[str, Any]:
        return {**super().settings(), "alpha": self.alpha, "init_std": self.init_std}

    def merge_operands(self, weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W, A, B)`` such that the merge is ``W += s · B @ A`` (:func:`relora_ext.ops.merge_`); ``W`` is
        ``weight`` (default: the layer's own) seen in the merge's layout."""
        raise NotImplementedError

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """A new tensor holding what ``weight`` becomes at the next merge, bit for bit (the same kernel on a
        copy); the layer is not changed."""
        w = self.weight.detach().clone()
        W, A, B = self.merge_operands(w)
        ops.merge_(W, A, B, self.scaling)
        return w

    def reset_operands(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(drawn, zeroed)``: the factor re-drawn from ``N(0, init_std²)`` and the one set to zero."""
        return self.lora_A, self.lora_B

    # -- the rules, checked without writing -----------------------------------------------------------

    def check(self) -> Optional[str]:
        """Why :meth:`merge_and_reset_` (or a cycle) would refuse this layer, or ``None``; writes nothing.

        The rules of :func:`relora_ext.ops.merge_` and :func:`relora_ext.ops.reset_` on this layer's
        tensors (dtypes, shapes against each other, one device, layouts, no overlap between what is
        written and what is read), finite factors, and the settings in the kernels' ranges.
        """
        try:
            W, A, B = self.merge_operands()
            drawn, zeroed = self.reset_operands()
            for name, t in (("lora_A", self.lora_A), ("lora_B", self.lora_B)):
                if t.dtype not in FLOAT_DTYPES:
                    return (f"{name} is {t.dtype}; the ReLoRA* cycle takes float32, bfloat16 or float16 "
                            "(convert the model, e.g. model.float())")
                if t.device.type == "meta":
                    return f"{name} is on the meta device (no data to merge); materialise the model first"
            if W is None:  # a quantized W is not materialised to be checked: the factors against its shape
                want = {"lora_A": (self.r, self.in_features), "lora_B": (self.out_features, self.r)}
                for name, shape in want.items():
                    if tuple(getattr(self, name).shape) != shape:
                        return f"{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}"
            with torch.no_grad():  # the factors require grad; the cycle writes them under no_grad
                if W is not None:
                    ops.check_merge("the merge", W, A, B, self.scaling, self.merge_names)
                ops.check_reset("the reset", drawn, zeroed, self.init_std, self.reset_names)
        except (TypeError, ValueError) as e:
            return str(e)
        for name, t in (("lora_A", self.lora_A), ("lora_B", self.lora_B)):
            if not bool(torch.isfinite(t).all()):
                return (f"{name} holds non-finite values (NaN/Inf). Lower the learning rate or use "
                        "torch.amp.GradScaler / gradient clipping")
        return None

    # -- the ReLoRA* step ---------------------------------------------------------------------------

    @torch.no_grad()
    def merge_and_reset_(self, *, seed: int = 0, offset: int = 0, rounding: str = "nearest",
                         merge_seed: Optional[int] = None) -> None:
        """One ReLoRA* restart of this layer: ``W += s · B · A``, then the drawn factor ``← init_std · N(0, 1)``
        and the other ``← 0``, so the layer's function is unchanged up to one rounding of ``W``.

        The draw comes from the counter-based Philox stream ``(seed, offset)`` (:func:`relora_ext.ops.reset_`):
        the same on every thread count and every data-parallel rank. ``rounding``/``merge_seed`` go to the
        merge (``"stochastic"`` needs ``merge_seed``). All or nothing: if :meth:`check` finds a problem,
        :class:`~relora_ext.CycleRefused` is raised before anything is written.

        Example::

            >>> layer = relora_ext.LoRALinear(16, 16, r=2)
            >>> x = torch.randn(3, 16); y0 = layer(x)
            >>> layer.merge_and_reset_(seed=0, offset=1)
            >>> torch.testing.assert_close(layer(x), y0)
        """
        where = f"{type(self).__name__}.merge_and_reset_"
        check_choice(where, "rounding", rounding, ROUNDINGS)
        check_u64(where, "seed", seed)
        check_u64(where, "offset", offset)
        if rounding == "stochastic" and merge_seed is None:
            raise ValueError(f"{where}: rounding='stochastic' needs merge_seed, got None")
        if merge_seed is not None:
            check_u64(where, "merge_seed", merge_seed)
        self.refuse_if_unfit(where)
        self.merge_and_reset_unchecked_(seed=seed, offset=offset, rounding=rounding, merge_seed=merge_seed)

    @torch.no_grad()
    def merge_and_reset_unchecked_(self, *, seed: int, offset: int, rounding: str,
                                   merge_seed: Optional[int]) -> None:
        """:meth:`merge_and_reset_` after :meth:`check` passed (the cycle checks every layer first)."""
        self.merge_(rounding=rounding, seed=merge_seed)
        drawn, zeroed = self.reset_operands()
        ops.reset_(drawn, zeroed, std=self.init_std, seed=seed, offset=offset)

    @torch.no_grad()
    def merge_(self, *, rounding: str = "nearest", seed: Optional[int] = None) -> None:
        """``W ← W + s · B · A`` in place (fp32 accumulation, one rounding into ``W``'s dtype).

        Leaves the factors as they are, so the layer's function changes (it now counts the update twice)
        until one is zeroed: use :meth:`merge_and_reset_` for the ReLoRA* step. Nearest rounding draws
        no random numbers; stochastic rounding takes its bits from ``seed`` (torch's generator if ``None``).
        """
        W, A, B = self.merge_operands()
        ops.merge_(W, A, B, self.scaling, rounding=rounding, seed=0 if seed is None and rounding == "nearest" else seed)

