"""The ReLoRA* cycle, all or nothing: merge, reset and prune every adapted layer.

Every ``reset_every`` optimizer steps, :class:`~relora_ext.optim.ReLoRAOptimizer` calls :func:`run_cycle`,
which for every adapted layer ``ℓ = 0, 1, ...`` (:func:`cycled_layers`, ``named_modules`` order), at cycle ``c``:

1. merges ``W ← W + s · B · A`` (fp32 accumulation, one rounding into ``W``'s dtype);
2. resets ``B ← 0``, ``A ← init_std · N(0, 1)`` from the Philox stream ``seed`` at :func:`reset_offset`;
3. prunes the optimizer state of ``A`` and ``B`` (:func:`prune_offset` for the random mode), then applies
   the first-moment guard.

A cycle is a transaction. It is planned and checked in full before anything is written: every layer
checks itself (:meth:`~relora_ext.adapter.CycledLayer.check`: the rules of the merge and the reset on its
tensors) and every state tensor it will prune is checked (dtype, device, layout, at most 16 per layer). A
refused cycle raises :class:`CycleRefused` and leaves weights, adapters, optimizer state and counters
bit-identical; under ``torch.distributed`` the ranks vote first,
so they refuse together. The work itself goes through a backend chosen once per layer:
:class:`LocalLayer` (plain tensors: one process, DDP), :class:`ShardedLayer` (FSDP2 DTensors, see
:mod:`relora_ext.distributed`) or :class:`SSTLayer` (an SST iteration instead of merge and reset).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import ops
from ._checks import FLOAT_DTYPES, CycleRefused, check_bool, check_choice, check_float, check_int, check_u64, is_dtensor
from .adapter import ROUNDINGS, CycledLayer
from .distributed import _shard_layout, merge_and_reset_sharded_, prune_sharded_
from .peft_layers import lora_views
from .sst import SSTLinear, sample_offset

__all__ = [
    "CycleSettings", "CycleRefused", "CycleResult", "run_cycle", "cycled_layers", "reset_offset", "prune_offset",
    "MAX_STATE_TENSORS",
]

PRUNE_MODES = ("magnitude", "random", "reset")
#: State tensors pruned per layer that :func:`prune_offset` can address.
MAX_STATE_TENSORS = 16
_STREAM_PRUNE = 1 << 62
_STREAM_ROUNDING = 1 << 63  # stochastic-rounding keys differ from the reset keys (= seed) in bit 63


# -- settings and random streams ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CycleSettings:
    """What a ReLoRA* run's cycles depend on; frozen, validated, saved with every checkpoint.

    Fields as the arguments of :class:`~relora_ext.optim.ReLoRAOptimizer`. Example:
    ``CycleSettings(reset_every=1000).to_dict()["prune_ratio"] == 0.99``.
    """

    reset_every: int
    prune_ratio: float = 0.99
    prune: str = "magnitude"
    seed: int = 0
    rounding: str = "nearest"
    prune_guard: bool = True

    def __post_init__(self) -> None:
        where = "ReLoRAOptimizer"
        object.__setattr__(self, "reset_every", check_int(where, "reset_every", self.reset_every, lo=1))
        object.__setattr__(self, "prune_ratio", check_float(where, "prune_ratio", self.prune_ratio, lo=0.0, hi=1.0))
        check_choice(where, "prune", self.prune, PRUNE_MODES)
        object.__setattr__(self, "seed", check_u64(where, "seed", self.seed))
        check_choice(where, "rounding", self.rounding, ROUNDINGS)
        check_bool(where, "prune_guard", self.prune_guard)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def check_saved(self, saved: Dict[str, Any], where: str) -> None:
        """Refuse saved settings that differ from these (a resume must continue the same cycles)."""
        for k, v in self.to_dict().items():
            if k in saved and saved[k] != v:
                raise ValueError(
                    f"{where}: the state was saved with {k}={saved[k]!r} but this optimizer has {k}={v!r}; "
                    "build the ReLoRAOptimizer with the saved settings")


def reset_offset(layer_index: int, cycle: int) -> int:
    """Philox offset of the reset draw of ``A`` for layer ``ℓ`` at cycle ``c``: ``ℓ · 2³² + c``.

    ``c`` counts from 0 (the first reset, after step ``reset_every``, is cycle 0). Valid for
    ``ℓ < 2³⁰`` and ``c < 2³²``, so it never meets :func:`prune_offset`'s range. Example:
    ``reset_offset(3, 1) == 3 * 2**32 + 1``.
    """
    return (layer_index << 32) + cycle


def prune_offset(layer_index: int, tensor_index: int, cycle: int) -> int:
    """Philox offset of the random-prune mask of one state tensor: ``2⁶² + (16ℓ + j) · 2³² + c``.

    ``j`` numbers the pruned state tensors of layer ``ℓ``: those of ``A`` in sorted state-key order, then
    those of ``B`` (Adam: ``A.exp_avg``, ``A.exp_avg_sq``, ``B.exp_avg``, ``B.exp_avg_sq`` → ``j = 0..3``).
    Valid for ``j < 16`` (a cycle with more state tensors per layer is refused), ``ℓ < 2²⁶`` and
    ``c < 2³²``; the ``2⁶²`` bit separates these streams from the reset draws.
    Example: ``prune_offset(0, 1, 2) == 2**62 + 2**32 + 2``.
    """
    if not 0 <= tensor_index < MAX_STATE_TENSORS:
        raise ValueError(f"prune_offset: tensor_index must be in [0, {MAX_STATE_TENSORS}), got {tensor_index}")
    return _STREAM_PRUNE + ((layer_index * MAX_STATE_TENSORS + tensor_index) << 32) + cycle


def merge_seed(settings: CycleSettings, offset: int) -> Optional[int]:
    """Key of the stochastic-rounding bits of a merge (``None`` for nearest rounding)."""
    return settings.seed ^ _STREAM_ROUNDING ^ offset if settings.rounding == "stochastic" else None


# -- backends: where a layer's tensors live -------------------------------------------------------------


class LocalLayer:
    """A layer whose parameters and optimizer state are plain tensors (one process, or DDP replicas)."""

    sharded = False

    @staticmethod
    def local(t: torch.Tensor) -> torch.Tensor:
        return t

    @staticmethod
    def merge_and_reset(layer, *, seed: int, offset: int, rounding: str, merge_seed: Optional[int]) -> None:
        layer.merge_and_reset_unchecked_(seed=seed, offset=offset, rounding=rounding, merge_seed=merge_seed)
        return None

    @staticmethod
    def prune(t: torch.Tensor, settings: CycleSettings, offset: int) -> int:
        if settings.prune == "random":
            return ops.prune_(t, settings.prune_ratio, mode="random", seed=settings.seed, offset=offset)
        return ops.prune_(t, settings.prune_ratio, mode=settings.prune)

    @staticmethod
    def guard_group(t: torch.Tensor):
        return None

    @classmethod
    def check_layer(cls, layer) -> Optional[str]:
        if any(is_dtensor(getattr(layer, n)) for n in layer.cycled):
            return "its parameters became DTensors after the optimizer was built (build it after fully_shard)"
        return layer.check()

    @classmethod
    def check(cls, plan) -> Optional[str]:
        """Why this layer's part of the cycle would be refused (``None`` if it would not); checks only."""
        return cls.check_layer(plan.layer) or _check_state(plan)

    @classmethod
    def run(cls, plan, settings: CycleSettings, cycle: int, state, guard_counts: Dict[int, Any]):
        """Merge, reset, prune, guard; returns ``(state entries kept, considered, full new A or None)``.
        Entries the guard zeroes on shards are left in ``guard_counts`` (summed over the shard group later)."""
        off = reset_offset(plan.index, cycle)
        full_A = cls.merge_and_reset(plan.layer, seed=settings.seed, offset=off, rounding=settings.rounding,
                                     merge_seed=merge_seed(settings, off))
        kept = total = 0
        for j, (_, _, t) in enumerate(plan.states):
            kept += int(cls.prune(t, settings, prune_offset(plan.index, j, cycle)))
            total += t.numel()
        if settings.prune_guard and settings.prune != "reset":
            for p in (getattr(plan.layer, n) for n in plan.layer.cycled):
                st = state.get(p)
                if not st:
                    continue
                zeroed = _guard_first_moment({k: cls.local(v) if isinstance(v, torch.Tensor) else v
                                              for k, v in st.items()})
                g = cls.guard_group(st.get("exp_avg"))
                if g is None:
                    kept -= zeroed
                else:
                    guard_counts.setdefault(id(g), (g, []))[1].append(zeroed)
        return kept, total, full_A


class ShardedLayer(LocalLayer):
    """A :class:`~relora_ext.lora.LoRALinear` whose parameters are FSDP2 DTensors: rows merged per shard,
    state pruned with global rules."""

    sharded = True

    @staticmethod
    def local(t):
        return t.to_local() if is_dtensor(t) else t

    @staticmethod
    def merge_and_reset(layer, *, seed: int, offset: int, rounding: str, merge_seed: Optional[int]):
        return merge_and_reset_sharded_(layer, seed=seed, offset=offset, rounding=rounding, merge_seed=merge_seed)

    @staticmethod
    def prune(t, settings: CycleSettings, offset: int) -> int:
        return prune_sharded_(t, settings.prune_ratio, mode=settings.prune, seed=settings.seed, offset=offset)

    @staticmethod
    def guard_group(t):
        return _shard_layout(t, "the optimizer state")[1] if is_dtensor(t) else None

    @classmethod
    def check_layer(cls, layer) -> Optional[str]:
        """The layer's rules on its global shapes and on this rank's shards (a DTensor has no storage to
        compare, so the shard-wise merge checks what it needs itself)."""
        W, A, B = layer.weight, layer.lora_A, layer.lora_B
        if tuple(A.shape) != (layer.r, W.shape[1]) or tuple(B.shape) != (W.shape[0], layer.r):
            return (f"expected weight (out, in), lora_A (r, in), lora_B (out, r) with r = {layer.r}; got "
                    f"weight {tuple(W.shape)}, lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}")
        local = {"weight": cls.local(W), "lora_A": cls.local(A), "lora_B": cls.local(B)}
        for k, t in local.items():
            if t.dtype not in FLOAT_DTYPES:
                return (f"{k} is {t.dtype}; the ReLoRA* cycle merges float32, bfloat16 or float16 weights only "
                        "(convert the model, e.g. model.float())")
        if local["lora_A"].dtype != local["lora_B"].dtype:
            return f"lora_A is {local['lora_A'].dtype} but lora_B is {local['lora_B'].dtype}; they must share a dtype"
        if len({t.device for t in local.values()}) > 1:
            return "weight, lora_A and lora_B are on different devices: " + ", ".join(
                f"{k} on {t.device}" for k, t in local.items())
        for k in ("lora_A", "lora_B"):
            if not local[k].is_contiguous():
                return f"{k} is not contiguous (shape {tuple(local[k].shape)}, strides {local[k].stride()})"
            if not bool(torch.isfinite(local[k]).all()):
                return (f"{k} holds non-finite values (NaN/Inf). Lower the learning rate or use "
                        "torch.amp.GradScaler / gradient clipping")
        Wl = local["weight"]
        if Wl.dim() == 2 and Wl.numel() > 0 and 1 not in Wl.stride():
            return f"weight has no unit stride (strides {Wl.stride()})"
        return None


class SSTLayer:
    """An :class:`~relora_ext.sst.SSTLinear`: an SST iteration (re-SVD at a round's end, resample, swap in,
    clear the state of the active columns) instead of merge and reset."""

    sharded = False
    local = staticmethod(LocalLayer.local)

    @staticmethod
    def check(plan) -> Optional[str]:
        return plan.layer.check() or _check_state(plan)

    @staticmethod
    def run(plan, settings: CycleSettings, cycle: int, state, guard_counts: Dict[int, Any]):
        """Re-SVD at a round's end, resample and swap in, clear the new columns' state; ``(0, cleared, None)``."""
        layer = plan.layer
        if (cycle + 1) % layer.rounds_every == 0:  # a round is over: restore orthogonality
            layer.resvd_()
            for _, t in _state_tensors(layer.sigma, state):  # Σ's entries were re-sorted by the SVD
                t.zero_()
        layer.resample_(seed=settings.seed, offset=sample_offset(plan.index, cycle))
        for _, _, t in plan.states:  # the new active columns start without history
            t.zero_()
        return 0, sum(t.numel() for _, _, t in plan.states), None


def cycled_layers(model) -> List[Tuple[str, Any]]:
    """The ``(name, layer)`` pairs a cycle works on, in ``named_modules`` order (the layer index ``ℓ``):
    every :class:`~relora_ext.adapter.CycledLayer` (LoRALinear, its quantized kind, LoRAEmbedding, SSTLinear)
    and, in a PEFT model, a :class:`~relora_ext.peft_layers.PeftLoRAView` of every active PEFT LoRA layer
    (:func:`~relora_ext.peft_layers.lora_views` refuses what a cycle would get wrong, naming the option)."""
    peft = dict(lora_views(model)) if "peft" in sys.modules else {}  # no PEFT imported: no PEFT layer
    return [(n, m if isinstance(m, CycledLayer) else peft[n]) for n, m in model.named_modules()
            if isinstance(m, CycledLayer) or n in peft]


def backend_for(layer):
    """The backend of ``layer``: :class:`SSTLayer`, :class:`ShardedLayer` if any of its parameters is a
    DTensor, else :class:`LocalLayer`."""
    if isinstance(layer, SSTLinear):
        return SSTLayer
    sharded = any(is_dtensor(getattr(layer, n)) for n in layer.cycled)
    return ShardedLayer if sharded else LocalLayer


# -- the plan and its checks ----------------------------------------------------------------------------


@dataclasses.dataclass
class _LayerPlan:
    index: int
    name: str
    layer: Any
    backend: Any
    states: List[Tuple[str, str, torch.Tensor]]  # (parameter name, state key, tensor to prune), in j order


def _state_tensors(param, state) -> List[Tuple[str, torch.Tensor]]:
    """The state tensors of ``param`` that a cycle prunes: shaped like it, floating, in sorted key order."""
    st = state.get(param)
    if not st:
        return []
    out = []
    for key in sorted(st, key=str):
        t = st[key]
        if isinstance(t, torch.Tensor) and t.shape == param.shape and t.is_floating_point():
            out.append((key, t))
    return out


def _check_state(plan: _LayerPlan) -> Optional[str]:
    if len(plan.states) > MAX_STATE_TENSORS:
        return (f"its parameters have {len(plan.states)} optimizer-state tensors to prune; at most "
                f"{MAX_STATE_TENSORS} per layer have their own random stream")
    for pname, key, t in plan.states:
        p = plan.backend.local(getattr(plan.layer, pname))
        lt = plan.backend.local(t)
        if lt.dtype not in FLOAT_DTYPES:
            return f"optimizer state {pname}[{key!r}] is {lt.dtype}; pruning takes float32, bfloat16 or float16 state"
        if lt.device != p.device:
            return f"optimizer state {pname}[{key!r}] is on {lt.device} but {pname} is on {p.device}"
        if not lt.is_contiguous():
            return f"optimizer state {pname}[{key!r}] is not contiguous (strides {lt.stride()})"
    return None


def _plan(layers: Sequence[Tuple[str, Any]], backends: Sequence[Any], state) -> List[_LayerPlan]:
    plans = []
    for li, ((name, layer), backend) in enumerate(zip(layers, backends)):
        states = [(pname, key, t) for pname in layer.cycled
                  for key, t in _state_tensors(getattr(layer, pname), state)]
        plans.append(_LayerPlan(li, name, layer, backend, states))
    return plans


def _collective_device(plans: Sequence[_LayerPlan]) -> torch.device:
    """The device of the parameters: collectives about them run there (NCCL takes CUDA tensors only)."""
    first = plans[0]
    return first.backend.local(getattr(first.layer, first.layer.cycled[0])).device


def _vote(problems: List[Optional[str]], device, group) -> List[bool]:
    """Per layer, whether any rank found a problem (an all-reduce on the parameters' device)."""
    flags = torch.tensor([p is not None for p in problems], dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return [bool(f) for f in flags.tolist()]


# -- running a cycle ------------------------------------------------------------------------------------


@dataclasses.dataclass
class CycleResult:
    """What a cycle did: state entries kept and considered by the prune (summed over layers), and the
    full new ``A`` of each sharded layer (``None`` for local ones), for the ranks' consistency check."""

    kept: int
    total: int
    full_A: List[Optional[torch.Tensor]]


@torch.no_grad()
def run_cycle(layers: Sequence[Tuple[str, Any]], backends: Sequence[Any], state, settings: CycleSettings,
              cycle: int, *, group=None, distributed: bool = False) -> CycleResult:
    """Run cycle ``cycle`` on ``layers`` (``(name, layer)`` pairs, layer index = position), all or nothing.
    ``state`` is the optimizer's ``state`` mapping; ``backends`` the backend of each layer (:func:`backend_for`).

    Raises :class:`CycleRefused` (nothing changed, on every rank) if any layer or state tensor would be
    refused. Example: ``run_cycle(lora_layers(model), [LocalLayer] * n, opt.state, CycleSettings(100), 0)``.
    """
    plans = _plan(layers, backends, state)
    problems = [plan.backend.check(plan) for plan in plans]
    refused = [p is not None for p in problems]
    if distributed:
        refused = _vote(problems, _collective_device(plans), group)
    for plan, problem, bad in zip(plans, problems, refused):
        if bad:
            why = problem or "refused on another rank"
            raise CycleRefused(f"ReLoRAOptimizer: cycle {cycle} refused, nothing was changed: layer {plan.name!r}: "
                               f"{why}")

    kept = total = 0
    full_A: List[Optional[torch.Tensor]] = []
    guard_counts: Dict[int, Tuple[Any, List[int]]] = {}
    for plan in plans:
        k, t, a = plan.backend.run(plan, settings, cycle, state, guard_counts)
        kept, total = kept + k, total + t
        full_A.append(a)
    if guard_counts:  # entries zeroed by the guard on shards: sum over each shard group
        for g, counts in guard_counts.values():
            n = torch.tensor([sum(counts)], dtype=torch.int64, device=_collective_device(plans))
            dist.all_reduce(n, group=g)
            kept -= int(n)
    return CycleResult(kept, total, full_A)


def _guard_first_moment(st: Dict[str, Any]) -> int:
    """Zero Adam's ``exp_avg`` where every second-moment state is zero; returns how many entries that zeroed."""
    m = st.get("exp_avg")
    seconds = [st[k] for k in ("exp_avg_sq", "max_exp_avg_sq") if isinstance(st.get(k), torch.Tensor)]
    if not isinstance(m, torch.Tensor) or not seconds or any(v.shape != m.shape for v in seconds):
        return 0
    orphan = seconds[0] == 0
    for v in seconds[1:]:
        orphan &= v == 0
    orphan &= m != 0
    n = int(orphan.sum())
    if n:
        m.masked_fill_(orphan, 0)
    return n
