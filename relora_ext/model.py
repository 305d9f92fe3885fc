"""Model surgery: :class:`ReLoRAConfig`, :func:`wrap`, :func:`unwrap` and the selection helpers.

As PEFT separates config, layer and model, the layers (:mod:`relora_ext.lora`, :mod:`relora_ext.quantized`,
:mod:`relora_ext.sst`) know only themselves; this module decides which modules of a model become which
layer, and puts plain modules back. Every call here is all or nothing: a refused :func:`wrap` or
:func:`unwrap` leaves the model as it was.

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
import re
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._checks import F32_MAX, FLOAT_DTYPES, check_bool, check_float, check_int, check_rank, storage_key
from .adapter import CycledLayer
from .embedding import LoRAEmbedding, refuse_embedding_options
from .lora import LoRALinear, is_conv1d
from .quantized import QuantizedLoRALinear, is_quantized
from .sst import SSTLinear

__all__ = [
    "ReLoRAConfig", "wrap", "unwrap", "lora_layers", "print_trainable_parameters", "merged_state_dict",
    "install_save_hook", "remove_save_hook", "hold_merged_saves",
]

#: What ``target_modules`` / ``exclude_modules`` of :func:`wrap` accept.
ModuleSelector = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]

#: Final name components treated as an output head by :func:`wrap`'s default selection.
_HEAD_NAMES = frozenset({"lm_head", "head", "output"})


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


def _kind(mod: nn.Module) -> Optional[str]:
    """What :func:`wrap` makes of a module: ``"linear"``, ``"conv1d"``, ``"quantized"`` (bitsandbytes
    ``Linear4bit``/``Linear8bitLt``), ``"embedding"`` (adapted only when named) or ``None`` (not a candidate)."""
    if type(mod) is nn.Linear:
        return "linear"
    if type(mod) is nn.Embedding:
        return "embedding"
    if is_conv1d(mod):
        return "conv1d"
    if isinstance(mod, nn.Linear) and type(mod).__module__.startswith("bitsandbytes"):
        return "quantized" if is_quantized(mod) else None
    return None


def _owners(model: nn.Module) -> dict:
    """storage key -> {id(module): first name} of every module holding a parameter over that memory."""
    owners: dict = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(storage_key(p), {}).setdefault(id(mod), name)
    return owners


def output_head(model: nn.Module) -> Optional[nn.Module]:
    """The module ``model.get_output_embeddings()`` returns (``transformers`` models), or ``None``."""
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except Exception:  # noqa: BLE001 - a model may not implement it
            head = None
        if isinstance(head, nn.Module):
            return head
    return None


def _default_excluded(model: nn.Module, owners: dict) -> set:
    """ids of the modules that the default selection leaves alone (output heads, tied weights)."""
    excluded = set()
    head = output_head(model)
    if head is not None:
        excluded.add(id(head))
    for name, mod in model.named_modules():
        if _kind(mod) is not None:
            if len(owners.get(storage_key(mod.weight), ())) > 1:
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
    if isinstance(config, int) and not isinstance(config, bool):
        raise TypeError(f"wrap: the second positional argument is a ReLoRAConfig, got the int {config}; "
                        f"pass the rank by name: wrap(model, r={config})")
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
                f"wrap: {type(model).__name__} carries PEFT adapters ({name or 'the model'}: {cls.__name__}); it needs "
                "no wrap: ReLoRA* cycles PEFT's own LoRA layers. Build the optimizer on it directly: "
                "relora_ext.ReLoRAOptimizer(torch.optim.AdamW(peft_model.parameters()), peft_model, reset_every=...)")
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
    An :class:`torch.nn.Embedding` is adapted as :class:`relora_ext.LoRAEmbedding` only when ``target_modules``
    names it (an entry of a list, ``"embed_tokens"``, or a regular expression; never a predicate or the default); ``lora_dropout`` does not apply to it (its input is
    token ids). The output head is adapted as any linear layer when named (``"lm_head"``). A head tied to the
    embeddings (one storage) is refused, adapting either: a merge into one would change the other. Measured
    cost (``benchmarks/RESULTS.md``, bench_memory and train_lm_io_3k): at the LLaMA-130M shape, r = 128,
    adapting both cuts AdamW state from 0.53x to 0.23x and peak memory from 0.71x to 0.44x of full rank's
    (frozen W in bf16), and on the 3000-step Austen language model it raised validation perplexity over
    ReLoRA* with them trained full rank by 1.2% at period 500 and 2.8% at period 100 (2 seeds each).

    - ``target_modules=None`` or ``"all-linear"`` (default): every linear candidate **except** the output head and
      tied weights, namely the module returned by ``model.get_output_embeddings()`` (``transformers``
      models), any layer whose last name component is ``lm_head``, ``head`` or ``output``, and any layer
      whose weight Parameter is shared with another module (tied embeddings).
    - a list/tuple of strings: name suffixes, matched on whole components (``"q_proj"`` matches
      ``"model.layers.0.self_attn.q_proj"``, not ``"xq_proj"``); an entry that names only modules which
      cannot be adapted (a LayerNorm, a block) is refused with the reason;
    - a string: a regular expression that must match the whole qualified name (:func:`re.fullmatch`);
    - a callable ``(name, module) -> bool``.

    ``exclude_modules`` takes the same forms and removes layers from the selection. A module used at
    several places is adapted once (every use sees the same adapter) and can be targeted by any of its names.
    On a ``transformers`` model, ``wrap`` makes the model's own ``save_pretrained`` write the merged model
    (:func:`install_save_hook`); :func:`unwrap` takes that back.

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
    owners = _owners(model)
    target = None if cfg.target_modules == "all-linear" else cfg.target_modules
    default_excluded = _default_excluded(model, owners) if target is None else set()
    names: dict = {}  # id(module) -> (module, every name it has); a module used at several places is adapted once
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), (mod, []))[1].append(name)
    candidates, chosen = [], {}  # chosen: id -> (first name, module)
    for mod, mod_names in names.values():
        kind = _kind(mod)
        if kind is None or (kind == "embedding" and not isinstance(target, (str, list, tuple, set, frozenset))):
            continue  # an embedding is adapted only when target_modules names it (a name or a regex)
        candidates.append(mod_names[0])
        if target is None:
            ok = id(mod) not in default_excluded
        else:
            ok = any(_name_matches(n, mod, target, "target_modules") for n in mod_names)
        if ok and cfg.exclude_modules is not None and any(
                _name_matches(n, mod, cfg.exclude_modules, "exclude_modules") for n in mod_names):
            ok = False
        if ok:
            chosen[id(mod)] = (mod_names[0], mod)
    if not chosen:
        wrapped = [m for m in model.modules() if isinstance(m, CycledLayer)]
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
    if isinstance(target, (list, tuple, set, frozenset)):
        _refuse_unadaptable_targets(target, names, chosen)
    for entry in cfg.modules_to_save:  # a typo would freeze the module it meant to keep training
        if not any(_name_matches(n, m, [entry], "modules_to_save") for n, m in model.named_modules()):
            raise ValueError(f"wrap: modules_to_save entry {entry!r} matches no module of {type(model).__name__}")
    # Check every chosen layer before changing any (a refused wrap leaves the model as it was).
    for name, mod in chosen.values():
        sharers = [n for mid, n in owners[storage_key(mod.weight)].items() if mid != id(mod)]
        if sharers:
            raise ValueError(
                f"wrap: cannot adapt layer {name!r}: its weight shares memory with {sharers} (tied weights); a merge "
                "would change those modules too. Leave it out (exclude_modules) or untie the weights first")
        if _kind(mod) == "embedding":
            out_f, in_f = mod.num_embeddings, mod.embedding_dim
        else:
            out_f, in_f = (mod.nf, mod.nx) if is_conv1d(mod) else (mod.out_features, mod.in_features)
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
        if _kind(mod) == "embedding":
            refuse_embedding_options(f"wrap: cannot adapt layer {name!r}", mod)
    # Building an adapter freezes (and with weight_dtype converts) the weight it adopts: if a later layer's
    # construction refuses, put every adopted weight back as it was (the same tensors: nothing copied).
    adopted = [(p, p.data, p.requires_grad) for _, mod in chosen.values() for p in mod.parameters(recurse=False)]
    new = {}
    try:
        for key, (name, mod) in chosen.items():
            try:
                new[key] = _adapter(mod, cfg, settings)
            except (TypeError, ValueError) as e:
                raise type(e)(f"wrap: cannot adapt layer {name!r}, nothing was changed: {e}") from None
            new[key].train(mod.training)
    except BaseException:
        for p, data, requires_grad in adopted:
            p.data = data
            p.requires_grad_(requires_grad)
        raise
    for _, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):  # every use (named_children skips repeats)
            if id(child) in new:
                setattr(parent, child_name, new[id(child)])
    if cfg.freeze_others:
        keep = {id(getattr(layer, n)) for layer in new.values() for n in layer.trained}
        for name, mod in model.named_modules():
            if cfg.modules_to_save and _name_matches(name, mod, list(cfg.modules_to_save), "modules_to_save"):
                keep.update(id(p) for p in mod.parameters())
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
    install_save_hook(model)  # a transformers model's own save_pretrained now writes the merged model
    return model


def _adapter(mod: nn.Module, cfg: ReLoRAConfig, settings: dict) -> nn.Module:
    """The module that replaces ``mod``: an SSTLinear, a QuantizedLoRALinear, a LoRAEmbedding or a LoRALinear."""
    if cfg.method == "sst":
        return SSTLinear.from_linear(mod, r=cfg.r, weight_dtype=cfg.weight_dtype)
    if _kind(mod) == "quantized":
        return QuantizedLoRALinear.from_quantized(mod, **settings)
    if _kind(mod) == "embedding":
        return LoRAEmbedding.from_embedding(mod, **{k: v for k, v in settings.items() if k != "dropout"})
    return LoRALinear.from_linear(mod, **settings)


def _refuse_unadaptable_targets(target, names: dict, chosen: dict) -> None:
    """A ``target_modules`` entry that names modules none of which can be adapted is refused with the reason,
    never skipped in silence (an entry that matches nothing at all is left to the no-match message)."""
    for entry in target:
        matched = [(ns[0], mod) for mod, ns in names.values()
                   if any(_name_matches(n, mod, [entry], "target_modules") for n in ns)]
        if matched and not any(id(mod) in chosen for _, mod in matched):
            name, mod = matched[0]
            why = ("it is adapted already (relora_ext.unwrap(model) first to wrap it again)"
                   if isinstance(mod, CycledLayer) else
                   "only nn.Linear, transformers Conv1D, bitsandbytes Linear4bit/Linear8bitLt and nn.Embedding "
                   "can be adapted")
            raise ValueError(f"wrap: target_modules entry {entry!r} names {name!r} ({type(mod).__name__}), which cannot "
                             f"be adapted: {why}")


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
    adapter, a shape changed, an expanded weight), :class:`~relora_ext.CycleRefused` names it and no layer
    is changed.

    Example::

        >>> model = relora_ext.wrap(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), r=2,
        ...                         target_modules=["0"])
        >>> plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> plain.load_state_dict(relora_ext.unwrap(model).state_dict())   # strict
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unwrap: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, CycledLayer):
        return model.to_base()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, CycledLayer)]
    for name, layer in layers:  # all or nothing: every layer checks itself before any is merged
        layer.refuse_if_unfit("unwrap", name)
    converted = {id(layer): layer.to_base() for _, layer in layers}  # one merge per layer, however often used
    remove_save_hook(model)
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):  # every use (named_children skips repeats)
            if id(child) in converted:
                setattr(parent, child_name, converted[id(child)])
    return model


# -- the merged model: a state dict, and the model's own save_pretrained ------------------------------------


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` with every adapter merged: the keys, dtypes and layouts of the unwrapped model.

    Each adapted layer's entries are replaced by those of the module :func:`unwrap` would put back
    (:meth:`~relora_ext.adapter.CycledLayer.base_state_dict`: a LoRALinear's or LoRAEmbedding's ``weight``
    merged by the same kernel, bit for bit, a Conv1D's back in its ``(in, out)`` layout, an SSTLinear's
    ``U diag(Σ) Vᵀ``). The model is not changed. Refused, nothing returned, if a layer's check fails (NaN/Inf,
    say) or its base is quantized. Example: ``plain.load_state_dict(merged_state_dict(model))``.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, CycledLayer)]
    for name, layer in layers:
        layer.refuse_if_unfit("merged_state_dict", name)
    base = {id(layer): layer.base_state_dict() for _, layer in layers}  # one merge per layer
    merged = {}  # name -> its base state under its prefix; every name of a layer used at several places
    owner = {}  # state key -> the name of the adapted layer it belongs to
    for name, layer in model.named_modules(remove_duplicate=False):
        if isinstance(layer, CycledLayer):
            prefix = f"{name}." if name else ""
            for k in layer.state_dict():
                owner[prefix + k] = name
            merged[name] = {prefix + k: v for k, v in base[id(layer)].items()}
    out: Dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        name = owner.get(k)
        if name is None:
            out[k] = v
        elif name in merged:  # the first entry of this layer: its whole base state goes here
            out.update(merged.pop(name))
    return out


def install_save_hook(model: nn.Module) -> None:
    """Make ``model.save_pretrained(path)`` (a wrapped ``transformers`` model's own, the PEFT habit) write the
    merged model, as :func:`save_pretrained` does; a no-op for a model without ``save_pretrained``.

    The hook is an instance attribute (the class is not touched): ``save_pretrained(path, **kwargs)``
    calls the class's method with ``state_dict=merged_state_dict(model)``. A ``state_dict`` the caller
    passes is written as given. Inside ``Trainer.train`` with :class:`~relora_ext.ReLoRACallback`, the Trainer's
    checkpoints keep the unmerged training state (``weight``, ``lora_A``, ``lora_B``), so that
    ``resume_from_checkpoint`` continues exactly; ``trainer.save_model()`` after training writes the merged
    model. :func:`remove_save_hook` undoes it (:func:`unwrap` calls it; :func:`wrap` installs it). Example::

        >>> install_save_hook(model); model.save_pretrained("out/")   # loads into the plain architecture
    """
    if callable(getattr(type(model), "save_pretrained", None)):
        model.__dict__["save_pretrained"] = _MergedSavePretrained(model)


def remove_save_hook(model: nn.Module) -> None:
    """Undo :func:`install_save_hook`: ``model.save_pretrained`` is the class's again."""
    if isinstance(model.__dict__.get("save_pretrained"), _MergedSavePretrained):
        del model.__dict__["save_pretrained"]


class _MergedSavePretrained:
    """The ``save_pretrained`` :func:`install_save_hook` puts on a model (an object rather than a bound
    method, so that the model still pickles and deep-copies, the copy's hook pointing at the copy)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.held = False  # see hold_merged_saves

    def __call__(self, save_directory, *args: Any, state_dict=None, **kwargs: Any):
        model = self.model
        if state_dict is None and not self.held:
            state_dict = merged_state_dict(model)
        return type(model).save_pretrained(model, save_directory, *args, state_dict=state_dict, **kwargs)


def hold_merged_saves(model: nn.Module, held: bool) -> None:
    """While ``held``, the save hooks on ``model``'s modules (:func:`install_save_hook`) write the unmerged
    training state: :class:`~relora_ext.ReLoRACallback` holds them during ``Trainer.train``, whose checkpoints
    must resume exactly."""
    for m in model.modules():
        hook = m.__dict__.get("save_pretrained")
        if isinstance(hook, _MergedSavePretrained):
            hook.held = held
