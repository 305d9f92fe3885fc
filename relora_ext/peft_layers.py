"""ReLoRA* on PEFT's own LoRA layers: a PEFT model is cycled as it is, without re-wrapping.

A PEFT LoRA layer (``peft.tuners.lora.Linear`` and its bitsandbytes ``Linear8bitLt``/``Linear4bit``
variants) already computes ``y = base(x) + s · B(A(dropout(x)))`` with

- the base weight ``layer.base_layer.weight`` (``(out, in)``; ``(in, out)`` under ``fan_in_fan_out``,
  GPT-2's ``Conv1D``),
- the factors ``layer.lora_A[name].weight`` ``(r, in)`` and ``layer.lora_B[name].weight`` ``(out, r)``,
- the scale ``layer.scaling[name]`` (``lora_alpha / r``, or ``/ sqrt(r)`` under ``use_rslora``).

:class:`PeftLoRAView` puts the interface of :class:`~relora_ext.adapter.LowRankAdapter` on such a layer
(``weight``, ``lora_A``, ``lora_B``, ``scaling``, ``init_std``, ``check()``, the merge and reset), reading
every tensor from the PEFT layer each time, so that the cycle merges ``B·A`` into PEFT's base weight,
re-draws ``A`` from the Philox stream, zeroes ``B`` and prunes the state of PEFT's own factor Parameters.
:func:`lora_views` lists the views of a model and refuses, naming the option and the layer, what a merge
would get wrong.

Example::

    >>> peft_model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules="all-linear"))
    >>> opt = relora_ext.ReLoRAOptimizer(torch.optim.AdamW(peft_model.parameters()), peft_model,
    ...                                  reset_every=500)
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn

from ._checks import storage_key
from .adapter import LowRankAdapter
from .quantized import dequantize, is_quantized, merge_into_

__all__ = ["PeftLoRAView", "lora_views", "is_peft_lora_layer"]

_QUANTIZED = ("Linear8bitLt", "Linear4bit")  # peft.tuners.lora.bnb's classes, merged via quantized.py


def is_peft_lora_layer(mod: nn.Module) -> bool:
    """``True`` for any PEFT LoRA layer (``peft.tuners.lora.LoraLayer``); ``False`` if PEFT is not installed."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return isinstance(mod, LoraLayer)


def _supported(mod: nn.Module) -> bool:
    from peft.tuners.lora import Linear

    if type(mod) is Linear:
        return True
    return type(mod).__module__ == "peft.tuners.lora.bnb" and type(mod).__name__ in _QUANTIZED


class PeftLoRAView(LowRankAdapter):
    """The adapter ``name`` of a PEFT LoRA linear layer, as a :class:`~relora_ext.adapter.LowRankAdapter`.

    Owns no tensor: ``lora_A`` is ``layer.lora_A[name].weight`` ``(r, in)``, ``lora_B`` is
    ``layer.lora_B[name].weight`` ``(out, r)`` (the very Parameters the optimizer holds, so their state is
    what a cycle prunes), ``weight`` the base weight as ``(out, in)`` (a transposed view under
    ``fan_in_fan_out``; the dequantized float32 weight, a new tensor, for a bitsandbytes base), ``scaling``
    is ``layer.scaling[name]``. Not a submodule of anything: the model's ``state_dict`` and
    ``named_modules`` are PEFT's.

    ``init_std`` (the std of ``A`` at every reset) defaults to ``1 / sqrt(3 · in_features)``: the standard
    deviation of PEFT's own initialisation of ``A`` (``kaiming_uniform_(a=sqrt(5))``, uniform on
    ``±1/sqrt(in)``), so ``A`` after a reset has the variance it had when PEFT built the layer. The draw is
    Gaussian from the Philox stream (:func:`relora_ext.ops.reset_`): every data-parallel rank draws the same
    ``A``. Set ``view.init_std`` on the view :func:`lora_views` returns (it is kept per layer) to change it.
    """

    def __init__(self, layer: nn.Module, adapter: str) -> None:
        super().__init__()
        object.__setattr__(self, "peft_layer", layer)  # a plain reference, not a registered submodule
        self.adapter = adapter
        self.in_features, self.out_features = int(layer.in_features), int(layer.out_features)
        self.quantized = is_quantized(layer.get_base_layer())  # PEFT's bnb classes, or its Linear on a bnb base
        self.init_std = 1.0 / math.sqrt(3 * self.in_features)

    # -- PEFT's settings: read, never copied --------------------------------------------------------

    @property
    def r(self) -> int:
        return int(self.peft_layer.r[self.adapter])

    @property
    def alpha(self) -> float:
        return float(self.peft_layer.lora_alpha[self.adapter])

    @property
    def scaling(self) -> float:
        return float(self.peft_layer.scaling[self.adapter])

    @property
    def lora_A(self) -> nn.Parameter:
        return self.peft_layer.lora_A[self.adapter].weight

    @property
    def lora_B(self) -> nn.Parameter:
        return self.peft_layer.lora_B[self.adapter].weight

    @property
    def base_layer(self) -> nn.Module:
        return self.peft_layer.get_base_layer()

    @property
    def weight(self) -> torch.Tensor:
        if self.quantized:
            return dequantize(self.base_layer)
        w = self.base_layer.weight
        return w.t() if self.peft_layer.fan_in_fan_out else w

    # -- the cycle's interface ------------------------------------------------------------------------

    def merge_operands(self) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        # a quantized W is rewritten whole from float32 (merge_): nothing of it to check here
        return (None if self.quantized else self.weight), self.lora_A, self.lora_B

    def check(self) -> Optional[str]:
        """Why a cycle would refuse this adapter now (PEFT's state may have changed since :func:`lora_views`),
        then :meth:`LowRankAdapter.check` (the merge and reset rules, finite factors); writes nothing."""
        problem = _peft_problem(self.peft_layer, self.adapter)
        if problem is None and self.adapter not in self.peft_layer.active_adapters:
            problem = f"adapter {self.adapter!r} is no longer active; build the ReLoRAOptimizer again"
        if problem is None and self.quantized:  # W is checked by no merge rule: are its codes there?
            problem = _quantized_problem(self.base_layer)
        return problem or super().check()

    @torch.no_grad()
    def merge_(self, *, rounding: str = "nearest", seed: Optional[int] = None) -> None:
        if not self.quantized:
            return super().merge_(rounding=rounding, seed=seed)
        merge_into_(self.base_layer, self.lora_A, self.lora_B, self.scaling)

    def to_base(self) -> nn.Module:
        raise NotImplementedError("PeftLoRAView: use PEFT's model.merge_and_unload() to leave PEFT")

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}, in={self.in_features}, out={self.out_features}, r={self.r}"


def _quantized_problem(base: nn.Module) -> Optional[str]:
    """Why :func:`~relora_ext.quantized.dequantize` would fail on ``base`` (checked before a cycle writes)."""
    w = base.weight
    if type(base).__name__ == "Linear4bit":
        ready = getattr(w, "quant_state", None) is not None
    else:
        ready = w.dtype == torch.int8 and (getattr(w, "SCB", None) is not None
                                           or getattr(getattr(base, "state", None), "SCB", None) is not None)
    return None if ready else (f"its {type(base).__name__} base weight is not quantized yet (move the model to "
                               "its device first)")


def _peft_problem(layer: nn.Module, adapter: str) -> Optional[str]:
    """What PEFT option of ``layer`` a merge of ``adapter`` would get wrong, or ``None``."""
    if adapter not in layer.lora_A:
        return f"it has no adapter {adapter!r} any more"
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None or layer.use_dora.get(adapter, False):
        option = "use_dora=True (DoRA)" if layer.use_dora.get(adapter, False) or "Dora" in type(variant).__name__ \
            else f"the LoRA variant {type(variant).__name__}"
        return (f"adapter {adapter!r} uses {option}: its magnitude/extra terms are not a plain B·A update, so a "
                "merge and reset would change the model; ReLoRA* cycles plain LoRA adapters only")
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return (f"adapter {adapter!r} has lora_bias=True: lora_B carries a bias a merge would have to move into "
                "the base layer; use lora_bias=False")
    if layer.merged:
        return (f"adapter(s) {layer.merged_adapters} are merged into the base weight (merge_adapter()); a cycle "
                "would add B·A twice: call unmerge_adapter() first")
    if layer.disable_adapters:
        return "its adapters are disabled (disable_adapter()): B·A is not part of the model now"
    return None


def lora_views(model: nn.Module) -> List[Tuple[str, PeftLoRAView]]:
    """The ``(name, view)`` of every PEFT LoRA layer of ``model`` with an active adapter, in ``named_modules``
    order; ``[]`` for a model without PEFT layers (or without PEFT installed).

    One view per layer and adapter, kept on the layer (not registered as a submodule), so repeated calls
    return the same objects. Raises ``ValueError`` naming the layer and the option for what a cycle cannot
    do correctly: several active adapters (``set_adapter`` one), DoRA (``use_dora``) and the other LoRA
    variants, ``lora_bias``, adapters merged into the base, and active PEFT layers of another type
    (``Embedding``, ``Conv1d/2d/3d``, ``MultiheadAttention``, GPTQ/AWQ/... bases). ``lora_dropout`` does not
    matter: it acts on the adapter's input while training, and with one active adapter per layer there is
    no second dropout to reconcile.

    On a ``PeftModel`` that has such layers it also makes ``model.save_pretrained`` refuse (an instance
    attribute; the class is untouched): the adapter file it writes holds the current ``A``, ``B`` only, not
    the base weights the cycles merge into, so it would silently drop the training.

    Example: ``[n for n, _ in lora_views(peft_model)][0] == "base_model.model.model.layers.0.self_attn.q_proj"``.
    """
    out = []
    holders: dict = {}  # memory -> names of the modules holding a parameter over it (tied weights)
    for mname, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            holders.setdefault(storage_key(p), set()).add(mname)
    for name, mod in model.named_modules():
        if not is_peft_lora_layer(mod):
            continue
        present = set(mod.lora_A) | set(getattr(mod, "lora_embedding_A", {}))
        active = [a for a in mod.active_adapters if a in present]
        if not active:
            continue
        where = f"relora_ext: PEFT layer {name!r}"
        if not _supported(mod):
            raise ValueError(f"{where}: a PEFT LoRA {type(mod).__module__}.{type(mod).__name__} layer is active; "
                             "ReLoRA* cycles peft.tuners.lora.Linear (and its bitsandbytes Linear8bitLt/Linear4bit) "
                             "only: leave this layer out of target_modules")
        if len(active) > 1:
            raise ValueError(f"{where}: several adapters are active ({active}); a cycle merges one adapter per "
                             "layer: call model.set_adapter(name) with one name")
        problem = _peft_problem(mod, active[0])
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        tied = sorted(holders.get(storage_key(mod.base_layer.weight), set()) - {f"{name}.base_layer"})
        if tied:
            raise ValueError(f"{where}: its base weight shares memory with {tied} (tied weights, as an output head "
                             "tied to the embeddings): a merge would change those modules too; leave it out of "
                             "target_modules or untie the weights")
        views = mod.__dict__.setdefault("_relora_views", {})  # bypasses nn.Module: not a submodule
        if active[0] not in views:
            views[active[0]] = PeftLoRAView(mod, active[0])
        out.append((name, views[active[0]]))
    if out:  # every PeftModel inside (under DDP the optimizer is given the wrapper); not its base model
        from peft import PeftModel

        for mod in model.modules():
            if isinstance(mod, PeftModel):
                mod.__dict__["save_pretrained"] = _refuse_adapter_only_save  # a plain function: still pickles
    return out


def _refuse_adapter_only_save(*args, **kwargs):
    """``PeftModel.save_pretrained`` writes the adapter (the current ``A``, ``B``), not the base weights, into
    which every ReLoRA* cycle merges the trained update: refused on a model :func:`lora_views` listed (one a
    ReLoRAOptimizer cycles), whose base weights may hold merged cycles, its own or a loaded checkpoint's."""
    raise ValueError(
        "save_pretrained: refused, nothing was written: this PEFT model is cycled by ReLoRA*, which merges the "
        "trained updates into the base weights; PEFT's adapter file holds only the current lora_A/lora_B. Save "
        "the whole model with model.merge_and_unload().save_pretrained(path), or the training state with "
        "relora_ext.save_checkpoint(path, model=model, optimizer=opt) (under transformers.Trainer: "
        "save_strategy='no', then either after training); peft.PeftModel.save_pretrained(model, path) still "
        "writes the adapter file alone")
