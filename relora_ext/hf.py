"""The Hugging Face ecosystem: merged ``save_pretrained``, PEFT adapter export, and a ``TrainerCallback``.

- :func:`merged_state_dict` / :func:`save_pretrained`: what a wrapped model computes, in the keys and
  layouts of the unmodified architecture (``lora_A``/``lora_B`` merged, transformers ``Conv1D`` weights
  back in their ``(in, out)`` layout), without changing the model. A wrapped model's own
  ``save_pretrained`` would write the adapters unmerged, and loading that file into the plain
  architecture drops them.
- :func:`export_peft_adapter`: what training learned, ``W − W₀`` per adapted layer, truncated by SVD to a
  chosen rank and written as a PEFT LoRA adapter (``adapter_model.safetensors`` +
  ``adapter_config.json``) that ``peft.PeftModel.from_pretrained(base, path)`` loads.
- :class:`ReLoRACallback`: logs every cycle of a :class:`~relora_ext.optim.ReLoRAOptimizer` driven by a
  ``transformers.Trainer``, and warns when the run is too short to see one.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ._checks import check_int
from .analysis import UpdateTracker, _effective_weight
from .lora import LoRALinear
from .model import hold_merged_saves, install_save_hook, lora_layers, merged_state_dict, remove_save_hook
from .peft_layers import PeftLoRAView, is_peft_lora_layer

__all__ = ["merged_state_dict", "save_pretrained", "install_save_hook", "remove_save_hook", "export_peft_adapter",
           "ReLoRACallback"]


def _is_conv1d_layer(layer: LoRALinear) -> bool:
    return getattr(layer, "_base_cls", None) is not None


def save_pretrained(model: nn.Module, path: Union[str, os.PathLike], **kwargs: Any) -> None:
    """``model.save_pretrained(path, state_dict=merged_state_dict(model), **kwargs)`` for a wrapped
    ``transformers`` model: the saved model loads into the plain architecture with every update merged,
    and the wrapped model goes on training unchanged. Example: ``relora_ext.save_pretrained(model, "out/")``.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(f"save_pretrained: model must be a transformers PreTrainedModel, got {type(model).__name__}")
    model.save_pretrained(os.fspath(path), state_dict=merged_state_dict(model), **kwargs)


def _base_weights(model: nn.Module, base) -> Dict[str, torch.Tensor]:
    """``{layer name: W₀ (out, in)}`` from an UpdateTracker, a mapping of names to weights, or a base model."""
    names = [n for n, _ in lora_layers(model)]
    if isinstance(base, UpdateTracker):
        w0 = dict(base.w0)
    elif isinstance(base, Mapping):
        w0 = dict(base)
    elif isinstance(base, nn.Module):
        w0 = {}
        for n in names:
            try:
                mod = base.get_submodule(n)
            except AttributeError:
                raise ValueError(f"export_peft_adapter: base model has no module {n!r}") from None
            w = mod.weight.detach()
            w0[n] = w.t() if type(mod).__name__ == "Conv1D" else w
    else:
        raise TypeError("export_peft_adapter: base must be an UpdateTracker, a {name: W0} mapping or the base model, "
                        f"got {type(base).__name__}")
    missing = [n for n in names if n not in w0]
    if missing:
        raise ValueError(f"export_peft_adapter: no base weight W0 for layers {missing[:8]}")
    for n, layer in lora_layers(model):
        if tuple(w0[n].shape) != (layer.out_features, layer.in_features):
            raise ValueError(f"export_peft_adapter: W0 of {n!r} has shape {tuple(w0[n].shape)}, expected "
                             f"{(layer.out_features, layer.in_features)} (out, in)")
    return w0


def _trained_others(model: nn.Module, layers) -> Tuple[List[Tuple[str, nn.Module]], List[Tuple[str, LoRALinear]]]:
    """What trains besides the low-rank factors: ``(modules for modules_to_save, adapted layers with a trained
    bias)``; raises ``ValueError`` naming what PEFT's adapter format cannot carry."""
    where = "export_peft_adapter: refused, nothing was written"
    adapted = {id(layer): name for name, layer in layers}
    owners: Dict[int, List[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    saved, biases = [], []
    for mname, mod in model.named_modules():
        trained = [(pn, p) for pn, p in mod.named_parameters(recurse=False) if p.requires_grad]
        if id(mod) in adapted:
            trained = [(pn, p) for pn, p in trained if pn not in ("lora_A", "lora_B")]
        if not trained:
            continue
        names = [f"{mname}.{pn}" if mname else pn for pn, _ in trained]
        for (pn, p), full in zip(trained, names):
            if len(owners[id(p)]) > 1:
                raise ValueError(f"{where}: the trained parameter {full!r} is shared with {owners[id(p)][1:]} (tied "
                                 "weights); PEFT's modules_to_save would untie them: train with "
                                 "ReLoRAConfig(freeze_others=True), or save the merged model with "
                                 "relora_ext.save_pretrained")
        if id(mod) in adapted:
            if [pn for pn, _ in trained] != ["bias"]:
                raise ValueError(f"{where}: the adapted layer's weight {names[0]!r} is trainable; PEFT's adapter "
                                 "keeps the base weight frozen")
            biases.append((mname, mod))
        elif not mname or any(id(m) in adapted for m in mod.modules()) or any(
                mname.startswith(a + ".") for a in adapted.values()):
            raise ValueError(f"{where}: trained parameters {names} sit on a module that holds adapted layers "
                             "too; PEFT's modules_to_save copies whole modules: freeze them or move them into "
                             "a submodule of their own")
        else:
            saved.append((mname, mod))
    return saved, biases


@torch.no_grad()
def export_peft_adapter(model: nn.Module, base, path: Union[str, os.PathLike], *, rank: int,
                        base_model_name_or_path: Optional[str] = None) -> Dict[str, float]:
    """Write what training learned as a PEFT LoRA adapter of rank ``rank``; returns the per-layer error.

    For every :class:`~relora_ext.lora.LoRALinear` ``ℓ`` of ``model``, the accumulated update
    ``ΔW = W + s·B·A − W₀`` (float64) is truncated by SVD to ``k = min(rank, out, in)`` directions,
    ``ΔW ≈ U_k Σ_k V_kᵀ``, and stored as PEFT's ``lora_B = U_k Σ_k^½`` ``(out, k)`` and
    ``lora_A = Σ_k^½ V_kᵀ`` ``(k, in)`` with ``lora_alpha = r = k`` (scale 1). The files are PEFT's:
    ``path/adapter_model.safetensors`` (keys ``base_model.model.<layer>.lora_A.weight``, ...) and
    ``path/adapter_config.json``; ``peft.PeftModel.from_pretrained(base_model, path)`` loads them onto the
    original base model. Everything else that trains goes with it, so that the loaded model is the trained
    one: the biases of adapted layers (PEFT's ``bias="lora_only"``) and every other module with a trainable
    parameter (embeddings, norms, a head: PEFT's ``modules_to_save``, copied whole). ReLoRA* trains those by
    default; with ``ReLoRAConfig(freeze_others=True)`` the adapter holds the low-rank factors only.
    Refused (nothing written), naming the parameter, where PEFT cannot carry a trained parameter: one
    shared with another module (tied embedding and head), one on the model's root module, a trainable
    ``weight`` of an adapted layer, or a module that holds adapted layers as well.

    Args:
        model: the wrapped, trained model.
        base: the starting weights ``W₀``: an :class:`~relora_ext.analysis.UpdateTracker` made right after
            wrapping, a ``{layer name: W₀ (out, in)}`` mapping, or the base model itself (an unwrapped copy
            with the same module names).
        path: the adapter directory (created).
        rank: ``k >= 1``. Over ``k`` cycles of rank ``r`` the update can reach rank ``k·r``; the returned
            errors say how much a smaller ``k`` loses.
        base_model_name_or_path: written into the config (default: ``model.name_or_path`` if present).

    Returns:
        ``{layer name: ‖ΔW − B·A‖_F / ‖ΔW‖_F}`` (0 for a layer whose update is 0).

    Example::

        >>> tracker = relora_ext.UpdateTracker(model)          # right after wrap
        >>> ...                                                # train
        >>> errors = export_peft_adapter(model, tracker, "adapter/", rank=64)
        >>> peft_model = peft.PeftModel.from_pretrained(base_model, "adapter/")
    """
    from safetensors.torch import save_file

    rank = check_int("export_peft_adapter", "rank", rank, lo=1)
    layers = lora_layers(model)
    if not layers:
        if any(is_peft_lora_layer(m) for m in model.modules()):
            raise ValueError(f"export_peft_adapter: model ({type(model).__name__}) is a PEFT model, cycled as it is: "
                             "its updates are merged into its base weights; save model.merge_and_unload() (the whole "
                             "model) or relora_ext.save_checkpoint (to resume)")
        raise ValueError(f"export_peft_adapter: model ({type(model).__name__}) has no LoRALinear layer (SST layers have no "
                         "low-rank adapter to export: save merged_state_dict(model) or unwrap(model) instead)")
    conv = {_is_conv1d_layer(layer) for _, layer in layers}
    if len(conv) > 1:
        raise ValueError("export_peft_adapter: the model mixes Conv1D and nn.Linear adapted layers; PEFT's "
                         "fan_in_fan_out is one setting per adapter: export them as two adapters")
    w0 = _base_weights(model, base)
    saved, lora_biases = _trained_others(model, layers)
    tensors, errors = {}, {}
    k_max = 0
    for name, layer in layers:
        delta = _effective_weight(layer).double() - w0[name].to(layer.weight.device).double()
        k = min(rank, *delta.shape)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        root = S[:k].sqrt()
        B = U[:, :k] * root
        A = root[:, None] * Vh[:k]
        norm = torch.linalg.matrix_norm(delta)
        errors[name] = float(torch.linalg.matrix_norm(delta - B @ A) / norm) if norm > 0 else 0.0
        if k < rank:  # pad to one rank for the whole adapter (PEFT's r is one number)
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], 1)
            A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], 0)
        dtype = layer.weight.dtype
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(dtype).contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(dtype).contiguous().cpu()
        k_max = max(k_max, k)
    for name, layer in lora_biases:  # PEFT's bias="lora_only": the adapted layers' biases, loaded onto the base
        tensors[f"base_model.model.{name}.base_layer.bias"] = layer.bias.detach().contiguous().cpu()
    for name, mod in saved:          # PEFT's modules_to_save: a trained copy of the whole module
        for pname, p in mod.named_parameters(recurse=False):
            tensors[f"base_model.model.{name}.{pname}"] = p.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": sorted(name for name, _ in layers), "bias": "lora_only" if lora_biases else "none",
        "fan_in_fan_out": conv == {True}, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": [name for name, _ in saved] or None,
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None),
    }
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return errors


try:
    from transformers import TrainerCallback as _TrainerCallback
except ImportError:  # transformers is optional: the callback then is a plain object
    _TrainerCallback = object


def _console(logs: Dict[str, Any]) -> None:
    """Print a log line the way the Trainer's progress callback does (above a running tqdm bar, floats to 4
    significant digits)."""
    logs = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in logs.items()}
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(logs, flush=True)
    else:
        tqdm.write(str(logs))


class ReLoRACallback(_TrainerCallback):
    """A ``transformers.TrainerCallback`` that logs the cycles of a :class:`~relora_ext.optim.ReLoRAOptimizer`.

    After every optimizer step that ran a cycle it appends ``{"step", "relora/cycle", "relora/kept",
    "relora/pruned_total"}`` (and ``"relora/update_rank"``, the mean effective rank of ``W − W₀``, if a
    ``tracker`` is given) to ``state.log_history`` and prints it on the main process's console like the
    Trainer's own log lines; every log line gets ``relora/cycles_done``. At the start of training it warns
    if ``max_steps`` is too short for any cycle (then ReLoRA* is plain LoRA). While training runs, the
    Trainer's checkpoints keep the unmerged training state even where :func:`install_save_hook` made
    ``save_pretrained`` merge, so ``resume_from_checkpoint`` continues exactly.

    Example::

        >>> opt = ReLoRAOptimizer(AdamW(model.parameters(), lr=1e-3), model, reset_every=500)
        >>> sched = JaggedCosineLR(opt, total_steps=5000, warmup_steps=100, restart_warmup_steps=20)
        >>> trainer = Trainer(model, args, train_dataset=ds, optimizers=(opt, sched),
        ...                   callbacks=[ReLoRACallback(opt)])
    """

    def __init__(self, optimizer, tracker: Optional[UpdateTracker] = None) -> None:
        if not hasattr(optimizer, "register_cycle_hook"):
            raise TypeError(f"ReLoRACallback: optimizer must be a ReLoRAOptimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.tracker = tracker
        self.pending = []
        optimizer.register_cycle_hook(lambda opt, info: self.pending.append(info))

    def on_train_begin(self, args, state, control, **kwargs):
        strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
        if strategy != "no" and any(isinstance(layer, PeftLoRAView) for _, layer in self.optimizer.model_layers):
            raise ValueError(
                f"ReLoRACallback: save_strategy={strategy!r} on a PEFT model cycled by ReLoRA*: the Trainer's "
                "checkpoints call PeftModel.save_pretrained, whose adapter file lacks the base weights the cycles "
                "merge into (refused at the first checkpoint, after that much training); pass "
                "save_strategy='no' and save with relora_ext.save_checkpoint or merge_and_unload().save_pretrained")
        if state.max_steps and state.max_steps < self.optimizer.reset_every:
            warnings.warn(f"ReLoRACallback: max_steps={state.max_steps} < reset_every={self.optimizer.reset_every}: "
                          "no cycle will run, so this is plain LoRA training", stacklevel=2)
        # the Trainer's checkpoints are training state: install_save_hook's merge waits for the end of training
        hold_merged_saves(self.optimizer.model, True)  # the model inside DDP too

    def on_train_end(self, args, state, control, **kwargs):
        hold_merged_saves(self.optimizer.model, False)

    def on_step_end(self, args, state, control, **kwargs):
        for info in self.pending:
            entry = {"relora/cycle": info["cycle"], "relora/kept": info["kept"], "relora/pruned_total": info["total"]}
            if self.tracker is not None:
                ranks = self.tracker.effective_ranks()
                entry["relora/update_rank"] = sum(ranks.values()) / max(len(ranks), 1)
            state.log_history.append({**entry, "step": state.global_step})
            if state.is_world_process_zero:  # on the console, as the Trainer prints its own log lines
                _console({**entry, "epoch": state.epoch or 0.0})
        self.pending.clear()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:  # for the reporters that run after this callback
            logs["relora/cycles_done"] = self.optimizer.cycles_done
        if state.log_history:  # the Trainer recorded this log line just before calling back
            state.log_history[-1]["relora/cycles_done"] = self.optimizer.cycles_done
