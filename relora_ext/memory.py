"""What training a model will hold in memory, per group of parameters: :func:`memory_report`.

ReLoRA* trains at LoRA's memory cost only where layers are adapted; the embeddings and the output head,
trained full rank, can hold most of the gradients and optimizer state of a small language model. This
report says where the bytes go before training starts (weights, gradients, optimizer state; activations
depend on the batch and are not counted).

Example::

    >>> model = relora_ext.wrap(TinyLlama(TinyLlamaConfig()), r=8)
    >>> opt = relora_ext.ReLoRAOptimizer(torch.optim.AdamW(model.parameters()), model, reset_every=100)
    >>> print(relora_ext.memory.memory_report(model, opt))
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch
from torch import nn

from .adapter import CycledLayer
from .analysis import _tensors_in
from .optim import ReLoRAOptimizer
from .model import output_head
from .peft_layers import is_peft_lora_layer

__all__ = ["GroupMemory", "MemoryReport", "memory_report", "GROUPS"]

#: The groups of a report, in the order printed: key -> label.
GROUPS = {
    "adapters": "adapters (low-rank factors; SST's sigma, active U, V)",
    "full_rank": "full-rank layers (weights trained, not adapted)",
    "embeddings_head": "embeddings and output head (full rank)",
    "norms": "norms",
    "other": "biases and other",
    "frozen": "frozen parameters",
    "buffers": "buffers (SST's U, V; rotary tables)",
}
#: Final name components taken as an output head when the model has no get_output_embeddings() (as wrap).
_HEAD_NAMES = frozenset({"lm_head", "head", "output"})
#: torch.optim.Adam/AdamW keep a float32 scalar ``step`` tensor per parameter.
_STEP_BYTES = 4


@dataclasses.dataclass
class GroupMemory:
    """One group's figures: ``params`` (elements), and bytes of the weights (``param_bytes``), of their
    gradients (``grad_bytes``: trainable parameters, in their dtype) and of their optimizer state
    (``state_bytes``)."""

    params: int = 0
    param_bytes: int = 0
    grad_bytes: int = 0
    state_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.state_bytes

    def add(self, other: "GroupMemory") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclasses.dataclass
class MemoryReport:
    """The result of :func:`memory_report`; ``print(report)`` shows it as a table.

    Fields: ``groups`` (key of :data:`GROUPS` -> :class:`GroupMemory`, every key present), ``total``,
    ``trainable`` (trainable parameter elements), ``state`` (how the optimizer-state bytes were obtained:
    ``"measured"``, ``"estimated"`` or ``"measured and estimated"``, with ``state_note`` saying how),
    ``adapted`` / ``full_rank`` (layer type name -> count of adapted layers / of layers whose weight is
    trained full rank), ``notes`` (warnings, e.g. trainable parameters the optimizer does not hold).
    """

    groups: Dict[str, GroupMemory]
    total: GroupMemory
    trainable: int
    state: str
    state_note: str
    adapted: Dict[str, int]
    full_rank: Dict[str, int]
    notes: List[str]
    model_name: str = ""
    optimizer_name: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        mib = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
        head = ("group", "params", "weights MiB", "grads MiB", "optim. state MiB", "total MiB")
        rows = [(GROUPS[k], f"{g.params:,d}", mib(g.param_bytes), mib(g.grad_bytes), mib(g.state_bytes),
                 mib(g.total_bytes)) for k, g in self.groups.items() if g.params]
        t = self.total
        rows.append(("total", f"{t.params:,d}", mib(t.param_bytes), mib(t.grad_bytes), mib(t.state_bytes),
                     mib(t.total_bytes)))
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(r, widths)))
        lines = [f"memory report: {self.model_name}" + (f", optimizer {self.optimizer_name}" if self.optimizer_name
                                                        else ", no optimizer given"),
                 fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows[:-1]),
                 fmt(tuple("-" * w for w in widths)), fmt(rows[-1])]
        share = 100 * self.trainable / max(t.params, 1)
        lines.append(f"trainable: {self.trainable:,d} of {t.params:,d} parameters ({share:.1f}%)")
        kinds = lambda d: ", ".join(f"{n} {k}" for k, n in d.items()) or "none"  # noqa: E731
        lines.append(f"adapted layers: {kinds(self.adapted)}; trained full rank: {kinds(self.full_rank)}")
        lines.append(f"optimizer state {self.state}: {self.state_note}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append("not counted: activations (they depend on batch, sequence length and checkpointing)")
        return "\n".join(lines)


def _is_adapted(mod: nn.Module) -> bool:
    return isinstance(mod, CycledLayer)  # LoRALinear (and its quantized kind), LoRAEmbedding, SSTLinear


def _peft_factors(model: nn.Module) -> set:
    """ids of the factors of PEFT's own LoRA layers (``lora_A``, ``lora_B``, DoRA's magnitudes, ...)."""
    return {id(p) for m in model.modules() if is_peft_lora_layer(m)
            for n, p in m.named_parameters() if n.startswith("lora_")}


def _group(name: str, mod: nn.Module, pname: str, p: torch.Tensor, head: Optional[nn.Module], peft: set) -> str:
    if not p.requires_grad:
        return "frozen"
    if _is_adapted(mod) or id(p) in peft:
        return "other" if pname == "bias" else "adapters"
    if "norm" in type(mod).__name__.lower():
        return "norms"
    if pname == "bias":
        return "other"
    is_head = mod is head or (head is None and name.rsplit(".", 1)[-1] in _HEAD_NAMES)
    if isinstance(mod, nn.Embedding) or is_head:
        return "embeddings_head"
    return "full_rank" if p.dim() >= 2 else "other"


def _key(t: torch.Tensor):
    """Where a tensor's elements live: tied Parameters, and views of one storage, count once."""
    if t.device.type == "meta" or t.numel() == 0:
        return ("id", id(t))
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _inner(optimizer):
    """The optimizer holding the state: a :class:`~relora_ext.ReLoRAOptimizer` wraps one (``.optimizer``)."""
    return optimizer.optimizer if isinstance(optimizer, ReLoRAOptimizer) else optimizer


def _estimator(inner):
    """``(per-parameter state bytes function or None, description)`` for an optimizer without state yet."""
    if inner is None or isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        def adam(p, group):
            n = 3 if group.get("amsgrad", False) else 2
            return n * p.numel() * p.element_size() + _STEP_BYTES

        what = "AdamW" if inner is None else type(inner).__name__
        return adam, (f"{what}: exp_avg and exp_avg_sq (and max_exp_avg_sq with amsgrad) in each parameter's "
                      "dtype, as torch.optim creates them, plus a 4-byte step")
    if isinstance(inner, torch.optim.SGD):
        return (lambda p, group: p.numel() * p.element_size() if group.get("momentum", 0) else 0,
                "SGD: a momentum buffer in the parameter's dtype when momentum > 0")
    return None, f"{type(inner).__name__}: unknown before its first step (counted as 0)"


def memory_report(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> MemoryReport:
    """Parameters, gradients and optimizer state of ``model``, in bytes, per group (:data:`GROUPS`).

    Every parameter and buffer is counted once (tied parameters and views of one storage included), in
    the first module that holds it (``named_modules`` order):

    - ``adapters``: the trainable tensors of adapted layers (:class:`~relora_ext.adapter.CycledLayer`:
      ``lora_A``/``lora_B`` of LoRALinear and LoRAEmbedding, SST's ``sigma``, ``U_active``, ``V_active``);
    - ``full_rank``: trainable weights (2-D and up) of layers that are not adapted, nor embeddings, head
      or norms;
    - ``embeddings_head``: trainable weights of ``nn.Embedding`` layers and of the output head
      (``model.get_output_embeddings()``, else a module named ``lm_head``, ``head`` or ``output``);
    - ``norms``: trainable parameters of modules whose class name contains ``Norm`` (their biases too);
    - ``other``: other biases and any other trainable parameter;
    - ``frozen``: parameters without ``requires_grad`` (the adapted layers' frozen weights);
    - ``buffers``: every buffer (SST's frozen ``U``/``V``, rotary tables...).

    Gradient bytes: each trainable parameter's size in its dtype (a gradient has the parameter's dtype).
    Optimizer state: read from the optimizer's ``state`` (every tensor in it, ``step`` included) for the
    parameters that have state; for those it holds without state yet (no step taken), **estimated**:
    Adam/AdamW two tensors in the parameter's dtype (three with ``amsgrad``) plus a 4-byte ``step``, SGD one
    momentum buffer (none without momentum); other optimizers 0, said in the note. ``optimizer=None``:
    estimated as AdamW for every trainable parameter. A :class:`~relora_ext.ReLoRAOptimizer` is read through
    the optimizer it wraps. ``report.state`` says which of measured/estimated the figures are.

    Example::

        >>> report = memory_report(model, opt)
        >>> print(report)                                   # a table
        >>> report.groups["embeddings_head"].state_bytes    # bytes
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"memory_report: model must be an nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"memory_report: optimizer must be None or a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    inner = None if optimizer is None else _inner(optimizer)
    group_of_param = {}  # id(p) -> the optimizer's param group holding it
    if inner is not None:
        for g in inner.param_groups:
            for p in g["params"]:
                group_of_param[id(p)] = g
    estimate, estimate_note = _estimator(inner)
    head = output_head(model)
    groups = {k: GroupMemory() for k in GROUPS}
    adapted: Dict[str, int] = {}
    full_rank: Dict[str, int] = {}
    seen, state_seen = set(), set()
    measured = estimated = 0  # parameters whose state was read / estimated
    trainable = not_held = 0
    peft = _peft_factors(model)
    for name, mod in model.named_modules():
        if _is_adapted(mod) or is_peft_lora_layer(mod):
            kind = type(mod).__name__ if _is_adapted(mod) else f"PEFT {type(mod).__name__}"
            adapted[kind] = adapted.get(kind, 0) + 1
        for pname, p in mod.named_parameters(recurse=False):
            if _key(p) in seen:
                continue
            seen.add(_key(p))
            key = _group(name, mod, pname, p, head, peft)
            if key in ("full_rank", "embeddings_head"):
                full_rank[type(mod).__name__] = full_rank.get(type(mod).__name__, 0) + 1
            size = p.numel() * p.element_size()
            g = GroupMemory(params=p.numel(), param_bytes=size, grad_bytes=size if p.requires_grad else 0)
            trainable += p.numel() if p.requires_grad else 0
            state = inner.state.get(p) if inner is not None else None
            if state:
                g.state_bytes = sum(t.numel() * t.element_size() for t in _tensors_in(state, state_seen))
                measured += 1
            elif p.requires_grad and (inner is None or id(p) in group_of_param):
                if estimate is not None:
                    g.state_bytes = estimate(p, group_of_param.get(id(p), {}))
                estimated += 1
            elif p.requires_grad:
                not_held += p.numel()
            groups[key].add(g)
        for _, b in mod.named_buffers(recurse=False):
            if b is None or _key(b) in seen:
                continue
            seen.add(_key(b))
            groups["buffers"].add(GroupMemory(params=b.numel(), param_bytes=b.numel() * b.element_size()))
    total = GroupMemory()
    for g in groups.values():
        total.add(g)
    if measured and estimated:
        state = "measured and estimated"
        note = (f"read from the optimizer for {measured} parameters; estimated for {estimated} without state yet "
                f"({estimate_note})")
    elif measured:
        state, note = "measured", "read from the optimizer's state (every tensor in it, step counters included)"
    else:
        state, note = "estimated", estimate_note + (" (no optimizer given)" if optimizer is None else " (no step yet)")
    notes = []
    if not_held:
        notes.append(f"{not_held:,d} trainable parameter elements are not held by the optimizer (they still get "
                     "gradients; no optimizer state counted for them)")
    return MemoryReport(groups=groups, total=total, trainable=trainable, state=state, state_note=note,
                        adapted=adapted, full_rank=full_rank, notes=notes, model_name=type(model).__name__,
                        optimizer_name="" if optimizer is None else (
                            type(optimizer).__name__ + (f"({type(inner).__name__})" if inner is not optimizer else "")))
