"""Small helpers to look inside a training run: the spectrum and effective rank of a layer's accumulated
update ``W − W₀`` (:func:`update_spectrum`, :func:`effective_rank`, :class:`UpdateTracker`), and a training
summary with a readable ``repr`` in Jupyter (:class:`TrainingStats`, :func:`optimizer_state_bytes`).

ReLoRA*'s claim is about rank: every cycle merges a rank-``r`` update into ``W``, so after ``k`` cycles the
accumulated update ``W − W₀`` can reach rank ``k · r``, where plain LoRA never exceeds ``r``. These helpers
measure exactly that.

Example::

    >>> model = relora_ext.wrap(TinyLlama(cfg), r=8)
    >>> tracker = UpdateTracker(model)                 # snapshots W₀ of every adapted layer
    >>> ...                                            # train
    >>> tracker.effective_ranks()                      # {'layers.0.self_attn.q_proj': 23.4, ...}
    >>> TrainingStats.collect(model, opt)              # cycles, trainable share, optimizer-state bytes
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from .cycle import cycled_layers
from .lora import LoRALinear
from .model import lora_layers
from .sst import SSTLinear

__all__ = ["effective_rank", "update_spectrum", "UpdateTracker", "TrainingStats", "optimizer_state_bytes"]


# ---------------------------------------------------------------------------------------------------
# Spectrum and effective rank
# ---------------------------------------------------------------------------------------------------


def _effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a layer applies, ``(out, in)``, in fp32: ``W + s·B·A`` for a LoRALinear, ``W`` otherwise."""
    if isinstance(layer, SSTLinear):  # U diag(Σ) Vᵀ
        return layer.weight_sst().float()
    if isinstance(layer, LoRALinear):
        w = layer.weight.detach().float()
        return w + layer.scaling * (layer.lora_B.detach().float() @ layer.lora_A.detach().float())
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"update_spectrum: layer must be a LoRALinear or have a 2-D .weight (out, in), got {type(layer).__name__}"
        )
    return weight.detach().float()


@torch.no_grad()
def update_spectrum(layer: nn.Module, w0: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, fp32) of the accumulated update ``W_eff − W₀`` of one layer.

    ``W_eff`` is what the layer applies now: ``W + s·B·A`` for a :class:`~relora_ext.LoRALinear` (so the
    update of the current, not yet merged cycle counts too), ``layer.weight`` for any other layer with a
    2-D weight (e.g. :class:`torch.nn.Linear` trained full-rank). ``w0`` ``(out, in)`` is the weight at the
    start of training (a copy, e.g. from :class:`UpdateTracker`).

    Returns a 1-D tensor of ``min(out, in)`` values. Cost: one SVD of an ``(out, in)`` matrix in fp32.

    Example::

        >>> layer = LoRALinear(64, 32, r=4); w0 = layer.weight.detach().clone()
        >>> with torch.no_grad(): layer.lora_B.normal_()
        >>> s = update_spectrum(layer, w0)      # (32,): 4 non-zero values, the rest ~0
    """
    w = _effective_weight(layer)
    if not isinstance(w0, torch.Tensor) or tuple(w0.shape) != tuple(w.shape):
        got = tuple(w0.shape) if isinstance(w0, torch.Tensor) else type(w0).__name__
        raise ValueError(f"update_spectrum: w0 must be a tensor of the layer's weight shape {tuple(w.shape)}, got {got}")
    return torch.linalg.svdvals(w - w0.detach().to(device=w.device, dtype=torch.float32))


def effective_rank(x: torch.Tensor, *, method: str = "entropy", rtol: float = 1e-2) -> float:
    """The effective rank of a matrix ``(m, n)`` or of its singular values ``(k,)``.

    - ``method="entropy"`` (default): Roy & Vetterli (2007), ``exp(−Σ pᵢ log pᵢ)`` with ``pᵢ = σᵢ / Σσ``. A
      real number in ``[1, k]``: ``k`` for a flat spectrum, ``ρ`` for ``ρ`` equal non-zero values. It never
      exceeds the rank, so for plain LoRA it stays ``≤ r``.
    - ``method="threshold"``: the number of ``σᵢ > rtol · σ_max`` (an integer-valued numerical rank; ``rtol``
      matters only here).

    Returns ``0.0`` for an all-zero input (no update yet).

    Example::

        >>> effective_rank(torch.tensor([1.0, 1.0, 1.0, 0.0]))
        3.0
        >>> effective_rank(torch.tensor([1.0, 0.5, 0.001]), method="threshold")
        2.0
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"effective_rank: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 2:
        s = torch.linalg.svdvals(x.detach().float())
    elif x.dim() == 1:
        s = x.detach().float().abs()
    else:
        raise ValueError(f"effective_rank: x must be a matrix (m, n) or singular values (k,), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("effective_rank: x holds NaN/Inf")
    if s.numel() == 0 or float(s.max()) == 0.0:
        return 0.0
    if method == "entropy":
        p = s.double() / s.double().sum()
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))
    if method == "threshold":
        if not (isinstance(rtol, (int, float)) and 0.0 <= rtol < 1.0):
            raise ValueError(f"effective_rank: rtol must be a float in [0, 1), got {rtol!r}")
        return float((s > rtol * s.max()).sum())
    raise ValueError(f"effective_rank: method must be 'entropy' or 'threshold', got {method!r}")


class UpdateTracker:
    """Keeps ``W₀`` of a model's layers to measure the accumulated updates ``W − W₀`` later.

    By default it tracks every :class:`~relora_ext.LoRALinear` and :class:`~relora_ext.SSTLinear` of ``model`` (after
    :func:`relora_ext.wrap`); pass ``layers`` (an iterable of ``(name, module)``) to track others, e.g. the
    :class:`torch.nn.Linear` layers of a model trained full-rank. Memory: one fp32 copy of each tracked
    weight, on its device.

    Example::

        >>> tracker = UpdateTracker(model)
        >>> ...                                       # train
        >>> tracker.spectra()["layers.0.mlp.up_proj"]  # singular values of W_eff − W₀, descending
        >>> tracker.effective_ranks(method="threshold")
    """

    def __init__(self, model: Optional[nn.Module] = None, *, layers: Optional[Iterable[Tuple[str, nn.Module]]] = None):
        if (model is None) == (layers is None):
            raise ValueError("UpdateTracker: pass exactly one of model (tracks its LoRALinear layers) or layers")
        pairs = list(cycled_layers(model)) if model is not None else list(layers)
        if not pairs:
            raise ValueError(
                "UpdateTracker: no layer to track (the model has no LoRALinear; wrap it first or pass layers=...)"
            )
        self.layers: Dict[str, nn.Module] = {}
        self.w0: Dict[str, torch.Tensor] = {}
        for name, layer in pairs:
            self.layers[name] = layer
            self.w0[name] = _effective_weight(layer).clone()

    def spectra(self) -> Dict[str, torch.Tensor]:
        """``{name: singular values of W_eff − W₀}`` for every tracked layer (see :func:`update_spectrum`)."""
        return {n: update_spectrum(layer, self.w0[n]) for n, layer in self.layers.items()}

    def effective_ranks(self, *, method: str = "entropy", rtol: float = 1e-2) -> Dict[str, float]:
        """``{name: effective_rank(spectrum)}`` for every tracked layer (see :func:`effective_rank`)."""
        return {n: effective_rank(s, method=method, rtol=rtol) for n, s in self.spectra().items()}

    def __repr__(self) -> str:
        return f"UpdateTracker({len(self.layers)} layers)"


# ---------------------------------------------------------------------------------------------------
# Training statistics
# ---------------------------------------------------------------------------------------------------


def _tensors_in(obj, seen: set, depth: int = 0):
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            seen.add(id(obj))
            yield obj
        return
    if depth > 4:
        return
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v, seen, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        # objects kept in the state, e.g. GaLore's projector with its (m, r) orthogonal matrix
        yield from _tensors_in(vars(obj), seen, depth + 1)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in ``optimizer.state``: every tensor in it, also inside nested dicts, lists and plain
    objects (such as GaLore's projector matrices), each counted once.

    Works for any :class:`torch.optim.Optimizer` and for :class:`~relora_ext.ReLoRAOptimizer` (whose
    ``state`` is the wrapped optimizer's). Zeroed (pruned) entries still count: pruning frees no memory.

    Example::

        >>> opt = torch.optim.AdamW(torch.nn.Linear(10, 10).parameters()); ...; opt.step()
        >>> optimizer_state_bytes(opt)    # exp_avg + exp_avg_sq of weight and bias, + the step scalars
        888
    """
    state = getattr(optimizer, "state", None)
    if state is None:
        raise TypeError(f"optimizer_state_bytes: expected an optimizer with .state, got {type(optimizer).__name__}")
    seen: set = set()
    return sum(t.numel() * t.element_size() for v in state.values() for t in _tensors_in(v, seen))


def _fmt_bytes(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


def _fmt_count(n: int) -> str:
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= k:
            return f"{n / k:.2f}{unit}"
    return str(n)


@dataclass
class TrainingStats:
    """A snapshot of a training run: steps and ReLoRA* cycles, parameter counts, optimizer-state bytes.

    Build it with :meth:`collect`. Prints as a short text block; in Jupyter it shows as a small table.

    Fields: ``steps`` (optimizer steps, ``None`` if unknown), ``cycles`` (merges done, 0 without ReLoRA*),
    ``reset_every``, ``params`` (all parameters), ``trainable`` (``requires_grad``), ``trainable_share``
    (``trainable / params``), ``lora_layers``, ``ranks`` (the distinct ``r`` of those layers),
    ``param_bytes``, ``optimizer_state_bytes`` (see :func:`optimizer_state_bytes`), ``prune_kept_share``
    (share of the pruned state entries kept at the last cycle, ``None`` before the first).

    Example::

        >>> stats = TrainingStats.collect(model, opt)
        >>> stats                     # doctest: +SKIP
        TrainingStats
          steps           : 600
          ReLoRA* cycles  : 4 (every 150 steps)
          ...
    """

    steps: Optional[int]
    cycles: int
    reset_every: Optional[int]
    params: int
    trainable: int
    trainable_share: float
    lora_layers: int
    ranks: Tuple[int, ...]
    param_bytes: int
    optimizer_state_bytes: int
    prune_kept_share: Optional[float] = None
    extra: Dict[str, object] = field(default_factory=dict)

    @classmethod
    def collect(cls, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, **extra) -> "TrainingStats":
        """Measure ``model`` and (optionally) ``optimizer``; ``extra`` key/values are shown too
        (e.g. ``val_loss=3.21``)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"TrainingStats.collect: model must be an nn.Module, got {type(model).__name__}")
        params = list({id(p): p for p in model.parameters()}.values())
        n = sum(p.numel() for p in params)
        nt = sum(p.numel() for p in params if p.requires_grad)
        layers = lora_layers(model)
        steps = cycles = reset_every = kept_share = None
        state_bytes = 0
        if optimizer is not None:
            state_bytes = optimizer_state_bytes(optimizer)
            steps = getattr(optimizer, "steps_taken", None)
            if steps is None:  # a plain optimizer: the largest per-parameter "step" counter
                vals = [s.get("step") for s in optimizer.state.values() if isinstance(s, dict) and "step" in s]
                steps = int(max(float(v) for v in vals)) if vals else 0
            cycles = getattr(optimizer, "cycles_done", 0)
            reset_every = getattr(optimizer, "reset_every", None)
            total = getattr(optimizer, "last_prune_total", 0)
            if total:
                kept_share = getattr(optimizer, "last_prune_kept", 0) / total
        return cls(steps=steps, cycles=cycles or 0, reset_every=reset_every, params=n, trainable=nt,
                   trainable_share=(nt / n if n else 0.0), lora_layers=len(layers),
                   ranks=tuple(sorted({m.r for _, m in layers})),
                   param_bytes=sum(p.numel() * p.element_size() for p in params),
                   optimizer_state_bytes=state_bytes, prune_kept_share=kept_share, extra=dict(extra))

    def _rows(self):
        cyc = str(self.cycles) + (f" (every {self.reset_every} steps)" if self.reset_every else "")
        rows = [
            ("steps", "?" if self.steps is None else str(self.steps)),
            ("ReLoRA* cycles", cyc),
            ("parameters", f"{_fmt_count(self.params)} ({_fmt_bytes(self.param_bytes)})"),
            ("trainable", f"{_fmt_count(self.trainable)} ({100 * self.trainable_share:.1f}%)"),
            ("LoRA layers", f"{self.lora_layers}" + (f" (r = {', '.join(map(str, self.ranks))})" if self.ranks else "")),
            ("optimizer state", _fmt_bytes(self.optimizer_state_bytes)),
        ]
        if self.prune_kept_share is not None:
            rows.append(("state kept at last prune", f"{100 * self.prune_kept_share:.2f}%"))
        for k, v in self.extra.items():
            rows.append((str(k), f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)))
        return rows

    def __repr__(self) -> str:
        rows = self._rows()
        w = max(len(k) for k, _ in rows)
        return "TrainingStats\n" + "\n".join(f"  {k:<{w}} : {v}" for k, v in rows)

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
            for k, v in self._rows()
        )
        return f"<table><caption style='text-align:left'><b>TrainingStats</b></caption>{body}</table>"
