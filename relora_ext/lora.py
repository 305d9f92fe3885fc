"""The LoRA layer and the model wrapping: :class:`LoRALinear`, :func:`wrap`, :func:`unwrap`.

A :class:`LoRALinear` is a drop-in :class:`torch.nn.Linear` whose weight ``W (out, in)`` is frozen and
whose update is carried by two trainable factors ``B (out, r)`` and ``A (r, in)``::

    y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ,        s = alpha / r

:func:`wrap` swaps the linear layers of a model for :class:`LoRALinear` in place; :func:`unwrap` merges
every adapter and puts plain :class:`torch.nn.Linear` layers back, so that the result loads into the
unmodified architecture. The ReLoRA* cycle (merge, reset, prune every ``T`` steps) is run by
:class:`relora_ext.optim.ReLoRAOptimizer`, which calls :meth:`LoRALinear.merge_and_reset_`.

Example::

    >>> import torch, relora_ext
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    >>> model = relora_ext.wrap(model, r=4, target_modules=["0", "2"])
    >>> model[0]
    LoRALinear(in_features=32, out_features=64, bias=True, r=4, alpha=4.0, dropout=0.0)
    >>> plain = relora_ext.unwrap(model)   # nn.Linear again, adapters merged into the weights
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import F32_MAX, FLOAT_DTYPES, check_bool, check_float, check_int, check_rank

__all__ = ["LoRALinear", "ReLoRAConfig", "wrap", "unwrap", "lora_layers", "print_trainable_parameters"]

#: What ``target_modules`` / ``exclude_modules`` of :func:`wrap` accept.
ModuleSelector = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]

#: Final name components treated as an output head by :func:`wrap`'s default selection.
_HEAD_NAMES = frozenset({"lm_head", "head", "output"})


def _ops():
    # Imported lazily so that importing this module never requires the compiled extension.
    from . import ops

    return ops


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


class LoRALinear(nn.Module):
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
        if alpha is None:
            alpha = float(self.r)
        self.alpha = check_float(where, "alpha", alpha, lo=0.0, lo_open=True, hi=F32_MAX)  # the kernels take float32
        self.scaling = self.alpha / self.r
        p = check_float(where, "dropout", dropout, lo=0.0, hi=1.0, hi_open=True)
        if init_std is None:
            init_std = 1.0 / math.sqrt(self.in_features)
        self.init_std = check_float(where, "init_std", init_std, lo=0.0, hi=F32_MAX)
        if weight_dtype is not None and weight_dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where}: weight_dtype must be None or one of "
                            f"{', '.join(str(d) for d in FLOAT_DTYPES)}, got {weight_dtype!r}")
        if weight_dtype is not None and not weight.dtype.is_floating_point:
            raise TypeError(f"{where}: weight_dtype needs a floating-point weight, got {weight.dtype}")
        factory = {"device": weight.device, "dtype": weight.dtype}  # A and B: the layer's dtype

        weight.requires_grad_(False)
        if weight_dtype is not None and weight.dtype != weight_dtype:
            with torch.no_grad():  # the same Parameter object, its storage now in weight_dtype
                weight.data = weight.data.to(weight_dtype)
        self.weight = weight
        self.bias = bias
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, **factory))
        self.dropout = p
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
        conv1d = _is_conv1d(linear)
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

    @torch.no_grad()
    def merge_(self, *, rounding: str = "nearest", seed: Optional[int] = None) -> None:
        """``W ← W + s · B · A`` in place (fp32 accumulation, one rounding into ``W``'s dtype).

        Leaves ``A`` and ``B`` as they are, so the layer's function changes (it now counts the update
        twice) until ``B`` is zeroed: use :meth:`merge_and_reset_` for the ReLoRA* step.
        Raises :class:`ValueError` (and leaves ``W`` untouched) if ``A`` or ``B`` holds NaN/Inf.
        """
        if seed is None and rounding == "nearest":
            seed = 0  # unused by nearest rounding; passing it keeps torch's global generator untouched
        _ops().merge_(self.weight, self.lora_A, self.lora_B, self.scaling, rounding=rounding, seed=seed)

    @torch.no_grad()
    def merge_and_reset_(self, *, seed: int = 0, offset: int = 0, rounding: str = "nearest",
                         merge_seed: Optional[int] = None) -> None:
        """One ReLoRA* restart of this layer: merge, then ``B ← 0`` and ``A ← init_std · N(0, 1)``.

        The new ``A`` is drawn from the counter-based Philox stream keyed by ``seed`` at ``offset``
        (:func:`relora_ext.ops.reset_`), so it does not depend on the thread count or on the process (every
        data-parallel rank draws the same ``A``). The layer's function is unchanged up to one rounding of
        ``W``. ``rounding``/``merge_seed`` are passed to the merge (``"stochastic"`` needs ``merge_seed``).
        All or nothing: if the merge or the reset would be refused (NaN/Inf in ``A`` or ``B``, a
        non-contiguous ``A``/``B``, an unsupported dtype or device), :class:`relora_ext.cycle.CycleRefused`
        is raised before anything is written.

        Example::

            >>> layer = LoRALinear(16, 16, r=2)
            >>> x = torch.randn(3, 16); y0 = layer(x)
            >>> layer.merge_and_reset_(seed=0, offset=1)
            >>> torch.testing.assert_close(layer(x), y0)
        """
        from .cycle import merge_and_reset_layer_

        merge_and_reset_layer_(self, seed=seed, offset=offset, rounding=rounding, merge_seed=merge_seed)

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

    def _check_mergeable(self, where: str, name: str = "") -> None:
        from .cycle import CycleRefused, check_layer

        problem = check_layer(name, self)
        if problem is not None:
            at = f" layer {name!r}:" if name else ""
            raise CycleRefused(f"{where}: refused, nothing was changed:{at} {problem}")

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
        self._check_mergeable("LoRALinear.to_linear")
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


# ---------------------------------------------------------------------------------------------------
# Model wrapping
# ---------------------------------------------------------------------------------------------------


def _name_matches(name: str, module: nn.Module, selector, arg: str) -> bool:
    if callable(selector) and not isinstance(selector, str):
        return bool(selector(name, module))
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    if isinstance(selector, (list, tuple, set, frozenset)):
        for s in selector:
            if not isinstance(s, str):
                raise TypeError(f"wrap: {arg} entries must be str name suffixes, got {type(s).__name__} ({s!r})")
            if name == s or name.endswith("." + s):
                return True
        return False
    raise TypeError(
        f"wrap: {arg} must be None, a regex str, a list of name suffixes or a predicate (name, module) -> bool, "
        f"got {type(selector).__name__}"
    )


def _is_conv1d(mod: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's projections): a linear layer with its weight stored ``(in, out)``."""
    cls = type(mod)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def _kind(mod: nn.Module) -> Optional[str]:
    """What :func:`wrap` makes of a module: ``"linear"``, ``"conv1d"``, ``"quantized"`` (bitsandbytes
    ``Linear4bit``/``Linear8bitLt``) or ``None`` (not a candidate)."""
    if type(mod) is nn.Linear:
        return "linear"
    if _is_conv1d(mod):
        return "conv1d"
    if isinstance(mod, nn.Linear) and type(mod).__module__.startswith("bitsandbytes"):
        from .quantized import is_quantized

        return "quantized" if is_quantized(mod) else None
    return None


def _default_excluded(model: nn.Module, owners: dict) -> set:
    """ids of the modules that the default selection leaves alone (output heads, tied weights)."""
    excluded = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except Exception:  # noqa: BLE001 - a model may not implement it
            head = None
        if isinstance(head, nn.Module):
            excluded.add(id(head))
    for name, mod in model.named_modules():
        if _kind(mod) is not None:
            if len(owners.get(id(mod.weight), ())) > 1:
                excluded.add(id(mod))
            if name.rsplit(".", 1)[-1] in _HEAD_NAMES:
                excluded.add(id(mod))
    return excluded


@dataclasses.dataclass(frozen=True)
class ReLoRAConfig:
    """How :func:`wrap` adapts a model, in PEFT's terms (``LoraConfig``'s names where they mean the same).

    Args:
        r: rank of every adapter (default 8, as PEFT's).
        lora_alpha: scale numerator, ``s = lora_alpha / r``. Default ``None`` means ``lora_alpha = r``
            (``s = 1``: the merged update is exactly ``B·A``; see :class:`LoRALinear`). PEFT's default is a
            fixed ``lora_alpha = 8``: pass ``lora_alpha=8`` to match a PEFT setup.
        lora_dropout: dropout on the adapter's input.
        target_modules: which layers (see :func:`wrap`); ``None`` or ``"all-linear"``: every linear layer
            (``nn.Linear``, transformers ``Conv1D``) but the output head and tied weights.
        exclude_modules: layers removed from the selection, same forms.
        init_std: standard deviation of ``A`` (default ``1/sqrt(in_features)``).
        freeze_others: ``False`` (default, ReLoRA*): every parameter that is not adapted (embeddings, norms,
            heads, biases) stays trainable. ``True`` (PEFT's LoRA): only the adapters (and ``modules_to_save``)
            train.
        modules_to_save: name suffixes of modules that stay trainable when ``freeze_others=True``.
        method: ``"relora"`` (default): :class:`LoRALinear` layers, ReLoRA*; ``"sst"``: Sparse Spectral Training,
            :class:`relora_ext.sst.SSTLinear` layers (``nn.Linear`` bases only).
        weight_dtype: the dtype the frozen weights are kept in between merges (see :class:`LoRALinear`), e.g.
            ``torch.bfloat16`` for a float32 model trained under bf16 autocast; with ``method="sst"`` the dtype
            of the frozen singular vectors ``U`` and ``V``.

    Example: ``wrap(model, ReLoRAConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))``.
    """

    r: int = 8
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    target_modules: ModuleSelector = None
    exclude_modules: ModuleSelector = None
    init_std: Optional[float] = None
    freeze_others: bool = False
    modules_to_save: Sequence[str] = ()
    method: str = "relora"
    weight_dtype: Optional[torch.dtype] = None

    def __post_init__(self) -> None:
        where = "ReLoRAConfig"
        check_int(where, "r", self.r, lo=1)
        if self.method not in ("relora", "sst"):
            raise ValueError(f"{where}: method must be 'relora' or 'sst', got {self.method!r}")
        if self.method == "sst" and (self.lora_alpha is not None or self.lora_dropout or self.init_std is not None):
            raise ValueError(f"{where}: method='sst' trains singular vectors and values: lora_alpha, lora_dropout "
                             "and init_std do not apply (leave them unset)")
        if self.weight_dtype is not None and self.weight_dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where}: weight_dtype must be None or one of {FLOAT_DTYPES}, got {self.weight_dtype!r}")
        if self.lora_alpha is not None:
            check_float(where, "lora_alpha", self.lora_alpha, lo=0.0, lo_open=True, hi=F32_MAX)
        check_float(where, "lora_dropout", self.lora_dropout, lo=0.0, hi=1.0, hi_open=True)
        if self.init_std is not None:
            check_float(where, "init_std", self.init_std, lo=0.0, hi=F32_MAX)
        check_bool(where, "freeze_others", self.freeze_others)
        if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
            raise TypeError(f"{where}: modules_to_save must be a list of name suffixes, got {self.modules_to_save!r}")
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))


#: wrap()'s older keyword names and the config fields they set.
_ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def _config(config: Optional[ReLoRAConfig], kwargs: dict) -> ReLoRAConfig:
    if config is not None and not isinstance(config, ReLoRAConfig):
        raise TypeError(f"wrap: config must be a ReLoRAConfig, got {type(config).__name__}")
    fields = {}
    for key, value in kwargs.items():
        if value is None:
            continue
        field = _ALIASES.get(key, key)
        if field in fields:
            raise TypeError(f"wrap: {key}= and {field}= both given; pass one")
        fields[field] = value
    if config is None:
        return ReLoRAConfig(**fields)
    return dataclasses.replace(config, **fields) if fields else config


def _refuse_foreign_wrappers(model: nn.Module) -> None:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        raise ValueError(f"wrap: model is wrapped in {type(model).__name__}; call relora_ext.wrap on the bare model "
                         "first, then wrap it in DDP, and build the optimizer from its parameters")
    for name, mod in model.named_modules():
        cls = type(mod)
        if cls.__module__.startswith("peft.") or hasattr(mod, "peft_config"):
            raise ValueError(
                f"wrap: {type(model).__name__} carries PEFT adapters ({name or 'the model'}: {cls.__name__}); merge "
                "them first (model = model.merge_and_unload()) or start from the base model")
        if cls.__name__.startswith("FSDP") or cls.__name__ == "FullyShardedDataParallel":
            raise ValueError(f"wrap: {name or 'the model'} is already sharded ({cls.__name__}); call relora_ext.wrap "
                             "before fully_shard / FSDP, and build the optimizer after sharding")


def wrap(
    model: nn.Module,
    config: Optional[ReLoRAConfig] = None,
    *,
    r: Optional[int] = None,
    lora_alpha: Optional[float] = None,
    lora_dropout: Optional[float] = None,
    init_std: Optional[float] = None,
    target_modules: ModuleSelector = None,
    exclude_modules: ModuleSelector = None,
    freeze_others: Optional[bool] = None,
    modules_to_save: Optional[Sequence[str]] = None,
    method: Optional[str] = None,
    weight_dtype: Optional[torch.dtype] = None,
    alpha: Optional[float] = None,
    dropout: Optional[float] = None,
) -> nn.Module:
    """Replace matching linear layers of ``model`` by :class:`LoRALinear`, in place.

    Settings come from ``config`` (a :class:`ReLoRAConfig`) and/or keywords of the same names (a keyword
    overrides the config's field; ``alpha``/``dropout`` are accepted for ``lora_alpha``/``lora_dropout``).

    Each replaced layer adopts the original ``weight`` and ``bias`` Parameters (no copy, see
    :meth:`LoRALinear.from_linear`); the frozen weight is the only parameter whose ``requires_grad``
    changes, unless ``freeze_others=True``. Wrap *before* DDP / ``fully_shard`` and before building the
    optimizer.

    Which layers: modules whose type is exactly :class:`torch.nn.Linear`, and transformers' ``Conv1D``
    (GPT-2), which is adapted natively (its ``(in, out)`` weight is adopted as an ``(out, in)`` view of the
    same memory, and :func:`unwrap` gives the ``Conv1D`` back). Subclasses of ``nn.Linear`` such as
    :class:`torch.nn.MultiheadAttention`'s ``out_proj`` are skipped (their owner reads ``.weight``
    directly). bitsandbytes ``Linear4bit``/``Linear8bitLt`` layers are adapted as
    :class:`relora_ext.quantized.QuantizedLoRALinear` (merge = dequantize, add in float32, requantize).

    - ``target_modules=None`` or ``"all-linear"`` (default): every candidate **except** the output head and
      tied weights, namely the module returned by ``model.get_output_embeddings()`` (``transformers``
      models), any layer whose last name component is ``lm_head``, ``head`` or ``output``, and any layer
      whose weight Parameter is shared with another module (tied embeddings).
    - a list/tuple of strings: name suffixes, matched on whole components (``"q_proj"`` matches
      ``"model.layers.0.self_attn.q_proj"``, not ``"xq_proj"``);
    - a string: a regular expression that must match the whole qualified name (:func:`re.fullmatch`);
    - a callable ``(name, module) -> bool``.

    ``exclude_modules`` takes the same forms and removes layers from the selection. A module used at
    several places is adapted once (every use sees the same adapter).

    Returns:
        ``model`` (for a bare ``nn.Linear`` model: its :class:`LoRALinear`, since a module cannot replace itself).

    Raises:
        ValueError: no layer matched (the message lists the candidate names), ``r`` is out of range for a
            matched layer, a matched layer's weight is tied to another module, or the model is already wrapped, carries PEFT adapters or is DDP/FSDP-wrapped. A
            refused wrap leaves the model as it was.

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=256))
        >>> relora_ext.wrap(model, r=8)                      # every projection; lm_head left alone
        >>> relora_ext.wrap(model, ReLoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))   # (a fresh model)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap: model must be an nn.Module, got {type(model).__name__}")
    cfg = _config(config, dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, init_std=init_std,
                               target_modules=target_modules, exclude_modules=exclude_modules,
                               freeze_others=freeze_others, modules_to_save=modules_to_save, method=method,
                               weight_dtype=weight_dtype, alpha=alpha, dropout=dropout))
    settings = dict(r=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, init_std=cfg.init_std)
    if cfg.weight_dtype is not None:
        settings["weight_dtype"] = cfg.weight_dtype
    if type(model) is nn.Linear:  # the model is one layer: it cannot be replaced in place, return its adapter
        return _adapter(model, cfg, settings)
    _refuse_foreign_wrappers(model)
    owners: dict = {}  # id(parameter) -> {id(module): name} of every module holding it
    for name, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), {}).setdefault(id(mod), name)
    target = None if cfg.target_modules == "all-linear" else cfg.target_modules
    default_excluded = _default_excluded(model, owners) if target is None else set()
    candidates = []
    chosen = {}  # id -> (first name, module); a module used at several places is adapted once
    for name, mod in model.named_modules():
        kind = _kind(mod)
        if kind is None:
            continue
        candidates.append(name)
        ok = id(mod) not in default_excluded if target is None else _name_matches(name, mod, target, "target_modules")
        if ok and cfg.exclude_modules is not None and _name_matches(name, mod, cfg.exclude_modules, "exclude_modules"):
            ok = False
        if ok:
            chosen[id(mod)] = (name, mod)
    if not chosen:
        from .sst import SSTLinear

        wrapped = [m for m in model.modules() if isinstance(m, (LoRALinear, SSTLinear))]
        if wrapped:
            kinds = sorted({type(m).__name__ for m in wrapped})
            raise ValueError(f"wrap: {type(model).__name__} is already wrapped ({len(wrapped)} {'/'.join(kinds)} "
                             "layers, and no other layer matched); call relora_ext.unwrap(model) first to wrap it again")
        shown = ", ".join(repr(c) for c in candidates[:12]) + (" ..." if len(candidates) > 12 else "")
        raise ValueError(
            f"wrap: no linear layer (nn.Linear, transformers Conv1D) of {type(model).__name__} matched "
            f"target_modules={cfg.target_modules!r}, exclude_modules={cfg.exclude_modules!r}; candidates "
            f"present: [{shown}]"
        )
    # Check every chosen layer before changing any (a refused wrap leaves the model as it was).
    for name, mod in chosen.values():
        sharers = [n for mid, n in owners[id(mod.weight)].items() if mid != id(mod)]
        if sharers:
            raise ValueError(
                f"wrap: cannot adapt layer {name!r}: its weight is shared with {sharers} (tied weights); a merge "
                "would change those modules too. Leave it out (exclude_modules) or untie the weights first")
        out_f, in_f = (mod.nf, mod.nx) if _is_conv1d(mod) else (mod.out_features, mod.in_features)
        try:
            check_rank("SSTLinear.from_linear" if cfg.method == "sst" else "LoRALinear.from_linear", cfg.r, in_f, out_f)
        except ValueError as e:
            raise ValueError(f"wrap: cannot adapt layer {name!r}: {e}") from None
        if cfg.weight_dtype is not None and _kind(mod) == "quantized":
            raise ValueError(f"wrap: cannot adapt layer {name!r} with weight_dtype={cfg.weight_dtype}: its weight is "
                             f"quantized ({type(mod).__name__})")
        if cfg.method == "sst" and _kind(mod) != "linear":
            raise ValueError(f"wrap: cannot adapt layer {name!r} with method='sst': it is a {type(mod).__name__}; "
                             "SST takes nn.Linear layers (leave it out with exclude_modules)")
    new = {}
    for key, (name, mod) in chosen.items():
        new[key] = _adapter(mod, cfg, settings)
        new[key].train(mod.training)
    for _, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):  # every use (named_children skips repeats)
            if id(child) in new:
                setattr(parent, child_name, new[id(child)])
    if cfg.freeze_others:
        adapter_params = ("sigma", "U_active", "V_active") if cfg.method == "sst" else ("lora_A", "lora_B")
        keep = {id(getattr(layer, n)) for layer in new.values() for n in adapter_params}
        for name, mod in model.named_modules():
            if cfg.modules_to_save and _name_matches(name, mod, list(cfg.modules_to_save), "modules_to_save"):
                keep.update(id(p) for p in mod.parameters())
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
    return model


def _adapter(mod: nn.Module, cfg: ReLoRAConfig, settings: dict) -> nn.Module:
    """The module that replaces ``mod``: an SSTLinear, a QuantizedLoRALinear or a LoRALinear."""
    if cfg.method == "sst":
        from .sst import SSTLinear

        return SSTLinear.from_linear(mod, r=cfg.r, weight_dtype=cfg.weight_dtype)
    if _kind(mod) == "quantized":
        from .quantized import QuantizedLoRALinear

        return QuantizedLoRALinear.from_quantized(mod, **settings)
    return LoRALinear.from_linear(mod, **settings)


def print_trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """Print and return ``(trainable, total)`` parameter counts, as PEFT's method of that name does.

    Example: ``relora_ext.print_trainable_parameters(model)`` prints
    ``trainable params: 1,234 || all params: 56,789 || trainable%: 2.1731``.
    """
    seen = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total


def lora_layers(model: nn.Module) -> list:
    """The ``(name, LoRALinear)`` pairs of ``model`` in :meth:`torch.nn.Module.named_modules` order.

    This order defines the layer index ``ℓ`` used by :class:`relora_ext.optim.ReLoRAOptimizer` for its
    per-layer random streams. Example: ``[n for n, _ in lora_layers(model)]``.
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def unwrap(model: nn.Module) -> nn.Module:
    """Merge every adapter of ``model`` and put plain :class:`torch.nn.Linear` layers back, in place.

    Each :class:`LoRALinear` is replaced by :meth:`LoRALinear.to_linear` (the merged weight and the bias
    Parameters are kept, not copied), so ``model.state_dict()`` has the keys of the unmodified
    architecture and loads into it with ``strict=True``. A model holding the same :class:`LoRALinear` twice
    is handled (one merge per layer). All or nothing: if any layer cannot be merged (NaN/Inf in its
    adapter, say), :class:`relora_ext.cycle.CycleRefused` names it and no layer is changed.

    Example::

        >>> model = relora_ext.wrap(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), r=2,
        ...                         target_modules=["0"])
        >>> plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> plain.load_state_dict(relora_ext.unwrap(model).state_dict())   # strict
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unwrap: model must be an nn.Module, got {type(model).__name__}")
    from .cycle import CycleRefused
    from .sst import SSTLinear

    if isinstance(model, LoRALinear):
        return model.to_base()
    if isinstance(model, SSTLinear):
        return model.to_linear()
    for name, layer in lora_layers(model):  # all or nothing: check every layer before merging any
        layer._check_mergeable("unwrap", name)
    for name, mod in model.named_modules():
        if isinstance(mod, SSTLinear) and mod.check() is not None:
            raise CycleRefused(f"unwrap: refused, nothing was changed: layer {name!r}: {mod.check()}")
    converted: dict = {}
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(mod._modules.items()):
            if isinstance(child, (LoRALinear, SSTLinear)):
                if id(child) not in converted:
                    converted[id(child)] = child.to_base() if isinstance(child, LoRALinear) else child.to_linear()
                setattr(mod, child_name, converted[id(child)])
    return model
