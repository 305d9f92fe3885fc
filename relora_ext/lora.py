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

import math
import re
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import FLOAT_DTYPES, check_float, check_rank

__all__ = ["LoRALinear", "wrap", "unwrap", "lora_layers"]

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
            rescaling rounding. This is also PEFT's default (``lora_alpha = r = 8``).
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

    # -- construction helpers --------------------------------------------------------------------

    def _adopt(self, weight: nn.Parameter, bias: Optional[nn.Parameter], *, r, alpha, dropout, init_std,
               where: str, weight_dtype: Optional[torch.dtype] = None) -> None:
        out_features, in_features = weight.shape
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.r = check_rank(where, r, self.in_features, self.out_features)
        if alpha is None:
            alpha = float(self.r)
        self.alpha = check_float(where, "alpha", alpha, lo=0.0, lo_open=True)
        self.scaling = self.alpha / self.r
        p = check_float(where, "dropout", dropout, lo=0.0, hi=1.0, hi_open=True)
        if init_std is None:
            init_std = 1.0 / math.sqrt(self.in_features)
        self.init_std = check_float(where, "init_std", init_std, lo=0.0)
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
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        requires_grad = linear.weight.requires_grad
        self._adopt(linear.weight, linear.bias, r=r, alpha=alpha, dropout=dropout, init_std=init_std,
                    weight_dtype=weight_dtype, where="LoRALinear.from_linear")
        self._weight_requires_grad = requires_grad
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


def _default_excluded(model: nn.Module) -> set:
    """ids of the Linear modules that the default selection leaves alone (output heads, tied weights)."""
    excluded = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except Exception:  # noqa: BLE001 - a model may not implement it
            head = None
        if isinstance(head, nn.Module):
            excluded.add(id(head))
    # a weight shared by several modules (tied input/output embeddings)
    owners: dict = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(mod))
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear:
            if len(owners.get(id(mod.weight), ())) > 1:
                excluded.add(id(mod))
            if name.rsplit(".", 1)[-1] in _HEAD_NAMES:
                excluded.add(id(mod))
    return excluded


def wrap(
    model: nn.Module,
    *,
    r: int,
    alpha: Optional[float] = None,
    dropout: float = 0.0,
    init_std: Optional[float] = None,
    target_modules: ModuleSelector = None,
    exclude_modules: ModuleSelector = None,
) -> nn.Module:
    """Replace matching :class:`torch.nn.Linear` modules of ``model`` by :class:`LoRALinear`, in place.

    Each replaced layer adopts the original ``weight`` and ``bias`` Parameters (no copy, see
    :meth:`LoRALinear.from_linear`); the frozen weight is the only parameter whose ``requires_grad``
    changes. Every other parameter (embeddings, norms, heads, biases) stays trainable, as ReLoRA* trains
    them. Wrap *before* building the optimizer.

    Which layers: only modules whose type is exactly :class:`torch.nn.Linear` are candidates (subclasses
    such as :class:`torch.nn.MultiheadAttention`'s ``out_proj`` are skipped: their owner reads ``.weight``
    directly and would bypass the adapter).

    - ``target_modules=None`` (default): every candidate **except** the output head and tied weights,
      namely the module returned by ``model.get_output_embeddings()`` (``transformers`` models), any
      layer whose last name component is ``lm_head``, ``head`` or ``output``, and any layer whose weight
      Parameter is shared with another module (tied embeddings).
    - a list/tuple of strings: name suffixes, matched on whole components (``"q_proj"`` matches
      ``"model.layers.0.self_attn.q_proj"``, not ``"xq_proj"``);
    - a string: a regular expression that must match the whole qualified name (:func:`re.fullmatch`);
    - a callable ``(name, module) -> bool``.

    ``exclude_modules`` takes the same forms and removes layers from the selection.

    Args:
        model: the model, modified in place and returned.
        r, alpha, dropout, init_std: see :class:`LoRALinear`.
        target_modules, exclude_modules: the selection, as above.

    Returns:
        ``model``.

    Raises:
        ValueError: no layer matched (the message lists the candidate names), or ``r`` is out of range
            for a matched layer.

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=256))
        >>> relora_ext.wrap(model, r=8)                      # every projection; lm_head left alone
        >>> relora_ext.wrap(model, r=8, target_modules=["q_proj", "v_proj"])   # (on a fresh model)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap: model must be an nn.Module, got {type(model).__name__}")
    settings = dict(r=r, alpha=alpha, dropout=dropout, init_std=init_std)
    if type(model) is nn.Linear:  # the model is one layer: it cannot be replaced in place, return its adapter
        return LoRALinear.from_linear(model, **settings)
    default_excluded = _default_excluded(model) if target_modules is None else set()
    candidates = []
    chosen = {}  # id -> (first name, module); a module used at several places is adapted once
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        candidates.append(name)
        if target_modules is None:
            ok = id(mod) not in default_excluded
        else:
            ok = _name_matches(name, mod, target_modules, "target_modules")
        if ok and exclude_modules is not None and _name_matches(name, mod, exclude_modules, "exclude_modules"):
            ok = False
        if ok:
            chosen[id(mod)] = (name, mod)
    if not chosen:
        if not candidates and lora_layers(model):
            raise ValueError(f"wrap: {type(model).__name__} is already wrapped (it holds LoRALinear layers and no "
                             "nn.Linear); call relora_ext.unwrap(model) first to wrap it again")
        shown = ", ".join(repr(c) for c in candidates[:12]) + (" ..." if len(candidates) > 12 else "")
        raise ValueError(
            f"wrap: no nn.Linear layer of {type(model).__name__} matched target_modules={target_modules!r}, "
            f"exclude_modules={exclude_modules!r}; nn.Linear layers present: [{shown}]"
        )
    # Check every chosen layer before changing any (a refused wrap leaves the model as it was).
    owners: dict = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), {}).setdefault(id(mod), name)
    for name, lin in chosen.values():
        sharers = [n for mid, n in owners[id(lin.weight)].items() if mid != id(lin)]
        if sharers:
            raise ValueError(
                f"wrap: cannot adapt layer {name!r}: its weight is shared with {sharers} (tied weights); a merge "
                "would change those modules too. Leave it out (exclude_modules) or untie the weights first")
        try:
            check_rank("LoRALinear.from_linear", r, lin.in_features, lin.out_features)
        except ValueError as e:
            raise ValueError(f"wrap: cannot adapt layer {name!r}: {e}") from None
    new = {}
    for key, (name, lin) in chosen.items():
        new[key] = LoRALinear.from_linear(lin, **settings)
        new[key].train(lin.training)
    for _, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent.named_children()):
            if id(child) in new:
                setattr(parent, child_name, new[id(child)])
    return model


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
    if isinstance(model, LoRALinear):
        return model.to_linear()
    for name, layer in lora_layers(model):  # all or nothing: check every layer before merging any
        layer._check_mergeable("unwrap", name)
    converted: dict = {}
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                if id(child) not in converted:
                    converted[id(child)] = child.to_linear()
                setattr(mod, child_name, converted[id(child)])
    return model
