"""The ReLoRA* optimizer wrapper: :class:`ReLoRAOptimizer`.

It wraps any :class:`torch.optim.Optimizer` and, after every ``reset_every``-th step, runs the ReLoRA*
cycle on every :class:`~relora_ext.lora.LoRALinear` of the model: merge ``W ← W + s·B·A``, reset
``B ← 0, A ← N(0, σ²)``, and prune the optimizer state of ``A`` and ``B``.

The ten-line loop::

    model = relora_ext.wrap(model, r=64)
    opt = relora_ext.ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, reset_every=1000)
    sched = relora_ext.JaggedCosineLR(opt, total_steps=N, warmup_steps=100, cycle_length=1000,
                                      restart_warmup_steps=50)
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from .lora import LoRALinear, lora_layers

__all__ = ["ReLoRAOptimizer", "reset_offset", "prune_offset"]

_PRUNE_MODES = ("magnitude", "random", "reset")
_STREAM_PRUNE = 1 << 62
_STREAM_ROUNDING = 1 << 63  # stochastic-rounding keys differ from the reset keys (= seed) in bit 63


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
    Valid for ``j < 16``, ``ℓ < 2²⁶`` and ``c < 2³²``; the ``2⁶²`` bit separates these streams from the
    reset draws. Example: ``prune_offset(0, 1, 2) == 2**62 + 2**32 + 2``.
    """
    return _STREAM_PRUNE + ((layer_index * 16 + tensor_index) << 32) + cycle


def _check_layer_dtypes(layers, where: str) -> None:
    """The native merge takes float32/bfloat16/float16 only: refuse other dtypes before any layer is merged."""
    from .ops import FLOAT_DTYPES

    for name, layer in layers:
        for pname in ("weight", "lora_A", "lora_B"):
            dt = getattr(layer, pname).dtype
            if dt not in FLOAT_DTYPES:
                raise TypeError(
                    f"{where}: layer {name!r}: {pname} is {dt}; the ReLoRA* cycle merges float32, bfloat16 or "
                    "float16 weights only (convert the model, e.g. model.float())"
                )


class ReLoRAOptimizer(torch.optim.Optimizer):
    r"""Wrap an optimizer so that it runs the ReLoRA* merge/reset/prune cycle every ``reset_every`` steps.

    ``step()`` steps the wrapped optimizer; after every ``reset_every``-th step it, for every
    :class:`~relora_ext.lora.LoRALinear` of ``model`` (in :meth:`~torch.nn.Module.named_modules` order,
    layer index ``ℓ = 0, 1, ...``):

    1. merges ``W ← W + s · B · A`` (fp32 accumulation, one rounding into ``W``'s dtype);
    2. resets ``B ← 0`` and ``A ← init_std · N(0, 1)`` drawn from the counter-based Philox stream keyed by
       ``seed`` at offset :func:`reset_offset` ``(ℓ, c) = ℓ · 2³² + c`` for cycle ``c = 0, 1, ...`` — a
       different draw per layer and per cycle, identical on every thread count and data-parallel rank;
    3. prunes every optimizer-state tensor of ``A`` and of ``B`` that has the parameter's shape (Adam's
       ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, SGD's ``momentum_buffer``, ...): ``"magnitude"``
       keeps exactly ``n - floor(prune_ratio · n)`` largest-magnitude entries, ``"random"`` keeps each entry
       with probability ``1 - prune_ratio`` (Philox stream ``seed`` at :func:`prune_offset`
       ``(ℓ, j, c)``), ``"reset"`` zeroes them; then (``prune_guard``, default on) Adam's ``exp_avg`` is
       zeroed where its second moment was. Scalar state (``step``) and the state of every other
       parameter are left untouched.

    The network's function is unchanged by a cycle (up to one rounding of ``W``). It behaves as an
    optimizer: ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's (shared, not
    copied), ``zero_grad``, ``add_param_group``, ``state_dict``/``load_state_dict`` (which include this
    wrapper's counters), step hooks, :mod:`torch.optim.lr_scheduler` classes and
    :class:`torch.amp.GradScaler` work with it. With a GradScaler, ``scaler.step(opt)`` calls
    ``opt.step()`` only when the gradients are finite (this wrapper deliberately reports
    ``_step_supports_amp_scaling = False`` so that even a fused inner optimizer takes that path), so a
    skipped step never counts toward the cycle.

    Args:
        optimizer: the optimizer to wrap; it must hold every ``lora_A``/``lora_B`` of ``model``.
        model: the wrapped model (see :func:`relora_ext.wrap`); must contain at least one LoRALinear.
        reset_every: cycle length ``T`` in optimizer steps, ``>= 1``.
        prune_ratio: ``p`` in ``[0, 1]``, the share of state entries zeroed (default 0.99).
        prune: ``"magnitude"`` (default), ``"random"`` or ``"reset"``.
        seed: 64-bit key of every reset / random-prune draw, in ``[0, 2**64)``.
        rounding: rounding of the merge into ``W``: ``"nearest"`` (default) or ``"stochastic"`` (for bf16/
            fp16 weights; its random bits use key ``seed ^ 2**63 ^ reset_offset(ℓ, c)``, never a reset key).
        prune_guard: after pruning (``"magnitude"``/``"random"``), also zero the entries of Adam's
            ``exp_avg`` whose second moment (``exp_avg_sq``, and ``max_exp_avg_sq`` with amsgrad) was zeroed.
            Default ``True``. Why: each tensor is pruned by its own magnitudes, so some kept ``exp_avg``
            entries lose their ``exp_avg_sq``; right after a reset ``∂L/∂A = 0``, so Adam's next update of such
            an entry is ``lr · m / (0 + eps)`` — measured on a 128×128 toy, entries of ``A`` jump from 0.3 to
            ~140 after every reset and the loss stalls (1.1 vs 0.26 with the guard). ``False`` gives the
            literal GUIDE §1 / reference-code pruning (every state tensor keeps exactly
            ``n - floor(p·n)`` entries); with ``True`` the second moments keep exactly that many and
            ``exp_avg`` keeps at most that many. Other optimizers' state (SGD's ``momentum_buffer``) is
            unaffected.
        process_group: the :mod:`torch.distributed` group whose ranks train this model together (default: the
            default group). Used only when ``torch.distributed`` is initialised with more than one rank.
        check_ranks: at the first cycle, verify that every rank has the same seed, settings and adapter layout
            and drew the same ``A`` (default ``True``); see :mod:`relora_ext.distributed`.

    Distributed training: under DDP every rank must pass the **same ``seed``** (the resets are then identical
    without communication); wrap the model with :func:`relora_ext.wrap` before DDP and build the optimizer from
    its parameters. Under FSDP2 (``fully_shard`` after ``wrap``, optimizer built after ``fully_shard``) the
    DTensor parameters are merged shard by shard and their state pruned with the global threshold.

    Attributes (for logging): ``steps_taken`` (inner steps taken through this wrapper), ``cycles_done``,
    ``last_prune_kept`` (state entries kept by the last prune, summed over layers), ``last_prune_total``
    (entries it considered).

    Example::

        >>> model = relora_ext.wrap(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), r=2,
        ...                         target_modules=["0", "2"])
        >>> opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=2)
        >>> for _ in range(4):
        ...     model(torch.randn(8, 16)).square().mean().backward(); opt.step(); opt.zero_grad()
        >>> opt.cycles_done
        2
    """

    # GradScaler must unscale and check the grads itself and call step() only when they are finite.
    _step_supports_amp_scaling = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        reset_every: int,
        prune_ratio: float = 0.99,
        prune: str = "magnitude",
        seed: int = 0,
        rounding: str = "nearest",
        prune_guard: bool = True,
        process_group: Any = None,
        check_ranks: bool = True,
    ) -> None:
        where = "ReLoRAOptimizer"
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{where}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, ReLoRAOptimizer):
            raise TypeError(f"{where}: optimizer is already a ReLoRAOptimizer; wrap the inner optimizer once")
        if not isinstance(model, nn.Module):
            raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(reset_every, bool) or not isinstance(reset_every, int):
            raise TypeError(f"{where}: reset_every must be an int, got {type(reset_every).__name__} ({reset_every!r})")
        if reset_every < 1:
            raise ValueError(f"{where}: reset_every must be >= 1 (optimizer steps per cycle), got {reset_every}")
        if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, (int, float)):
            raise TypeError(f"{where}: prune_ratio must be a float, got {type(prune_ratio).__name__}")
        if not (0.0 <= float(prune_ratio) <= 1.0):
            raise ValueError(f"{where}: prune_ratio must be in [0, 1], got {prune_ratio!r}")
        if prune not in _PRUNE_MODES:
            raise ValueError(f"{where}: prune must be one of {_PRUNE_MODES}, got {prune!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{where}: seed must be an int, got {type(seed).__name__} ({seed!r})")
        if not 0 <= seed < 1 << 64:
            raise ValueError(f"{where}: seed must be in [0, 2**64), got {seed}")
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"{where}: rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        if not isinstance(prune_guard, bool):
            raise TypeError(f"{where}: prune_guard must be a bool, got {type(prune_guard).__name__}")
        if not isinstance(check_ranks, bool):
            raise TypeError(f"{where}: check_ranks must be a bool, got {type(check_ranks).__name__}")

        layers = lora_layers(model)
        if not layers:
            raise ValueError(
                f"{where}: model ({type(model).__name__}) has no LoRALinear layer; call relora_ext.wrap(model, r=...) "
                "before building the optimizer"
            )
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for name, layer in layers:
            for pname in ("lora_A", "lora_B"):
                if id(getattr(layer, pname)) not in held:
                    raise ValueError(
                        f"{where}: the wrapped optimizer does not hold {name}.{pname} "
                        f"(shape {tuple(getattr(layer, pname).shape)}); build it from model.parameters() after "
                        "relora_ext.wrap(model, ...), so that it trains the adapters"
                    )

        _check_layer_dtypes(layers, where)
        self.optimizer = optimizer
        self.model_layers = layers
        self.reset_every = reset_every
        self.prune_ratio = float(prune_ratio)
        self.prune = prune
        self.seed = seed
        self.rounding = rounding
        self.prune_guard = prune_guard
        self.process_group = process_group
        self.check_ranks = check_ranks
        self._ranks_checked = False
        self.steps_taken = 0
        self.cycles_done = 0
        self.last_prune_kept = 0
        self.last_prune_total = 0

        # What torch.optim.Optimizer.__init__ sets up for hooks; param_groups/state/defaults are delegated.
        from collections import OrderedDict

        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    # -- delegation ---------------------------------------------------------------------------------

    @property
    def param_groups(self):
        """The wrapped optimizer's ``param_groups`` (the same list)."""
        return self.optimizer.param_groups

    @property
    def state(self):
        """The wrapped optimizer's ``state`` (the same mapping)."""
        return self.optimizer.state

    @property
    def defaults(self):
        """The wrapped optimizer's ``defaults``."""
        return self.optimizer.defaults

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["process_group"] = None  # process groups do not pickle; the default group is used after unpickling
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"ReLoRAOptimizer(reset_every={self.reset_every}, prune_ratio={self.prune_ratio}, prune={self.prune!r}, "
            f"seed={self.seed}, layers={len(self.model_layers)},\n{inner}\n)"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or set to ``None``) the gradients, as the wrapped optimizer does."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer (see :meth:`torch.optim.Optimizer.add_param_group`)."""
        self.optimizer.add_param_group(param_group)

    # -- stepping -----------------------------------------------------------------------------------

    def step(self, closure=None):
        """Step the wrapped optimizer; after every ``reset_every``-th step, run the ReLoRA* cycle.

        Returns what the wrapped optimizer's ``step`` returns (the closure's loss, if given).
        """
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self.steps_taken += 1
        if self.steps_taken % self.reset_every == 0:
            self.restart()
        return loss

    @torch.no_grad()
    def restart(self) -> None:
        """Run one cycle now (merge, reset, prune on every layer) and count it; ``step()`` calls it.

        Raises :class:`ValueError` naming the layer if an ``A`` or ``B`` holds NaN/Inf; all layers are checked
        first, so then no layer is merged and the cycle is not counted.

        Distributed (``torch.distributed`` initialised, more than one rank in ``process_group``): at the first
        cycle this optimizer runs, every rank checks that the others have the same setup (seed, settings,
        adapter layout) and, after the reset, the same ``A`` draws (and merged ``W`` when replicated); a
        difference raises :class:`relora_ext.distributed.ConsistencyError` on every rank (``check_ranks=False``
        skips it). FSDP2 (DTensor) layers are merged shard by shard and their optimizer state pruned with the
        global threshold (:mod:`relora_ext.distributed`). Every rank must call ``step()``/``restart()`` together.
        """
        from . import distributed as D

        c = self.cycles_done
        multi = D.is_distributed(self.process_group)
        check = multi and self.check_ranks and not self._ranks_checked
        if check:
            D.check_consistency(
                D.fingerprint(self), group=self.process_group, what=f"ReLoRA* setup at cycle {c}",
                hint="Every rank must build the same model, call relora_ext.wrap with the same arguments and pass "
                     "the same seed and settings to ReLoRAOptimizer.")
        _check_layer_dtypes(self.model_layers, f"ReLoRAOptimizer: cycle {c}")
        sharded = [D.is_dtensor(layer.weight) or D.is_dtensor(layer.lora_A) for _, layer in self.model_layers]
        bad = []
        for name, layer in self.model_layers:  # all-or-nothing: refuse before any layer is merged
            flags = []
            for pname in ("lora_A", "lora_B"):
                p = getattr(layer, pname)
                p = p.to_local() if D.is_dtensor(p) else p
                flags.append(not bool(torch.isfinite(p).all()))
            bad.append(flags)
        if multi and any(sharded):  # shards differ per rank: agree on the verdict so that every rank raises
            import torch.distributed as dist

            t = torch.tensor(bad, dtype=torch.int32).reshape(-1, 2)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
            bad = t.bool().tolist()
        for (name, layer), flags in zip(self.model_layers, bad):
            for pname, is_bad in zip(("lora_A", "lora_B"), flags):
                if is_bad:
                    raise ValueError(
                        f"ReLoRAOptimizer: cycle {c}, layer {name!r}: {pname} holds non-finite values (NaN/Inf); "
                        "no layer was merged. Lower the learning rate or use torch.amp.GradScaler / gradient clipping"
                    )
        kept = total = 0
        full_A = []
        guard_sharded: Dict[Any, list] = {}
        for li, (name, layer) in enumerate(self.model_layers):
            off = reset_offset(li, c)
            merge_seed = (self.seed ^ _STREAM_ROUNDING ^ off) if self.rounding == "stochastic" else None
            try:
                if sharded[li]:
                    full_A.append(D.merge_and_reset_sharded_(layer, seed=self.seed, offset=off,
                                                             rounding=self.rounding, merge_seed=merge_seed))
                else:
                    layer.merge_and_reset_(seed=self.seed, offset=off, rounding=self.rounding, merge_seed=merge_seed)
                    full_A.append(None)
            except ValueError as e:
                raise ValueError(f"ReLoRAOptimizer: cycle {c}, layer {name!r}: {e}") from None
            k, t = self._prune_layer(li, layer, c, guard_sharded)
            kept += k
            total += t
        if guard_sharded:  # entries zeroed by the guard on shards: sum over each shard group
            import torch.distributed as dist

            for group, counts in guard_sharded.values():
                g = torch.tensor([sum(counts)], dtype=torch.int64)
                dist.all_reduce(g, group=group)
                kept -= int(g)
        if check:
            D.check_consistency(
                D.draw_hashes(self, full_A), group=self.process_group, what=f"reset draw / merged weight at cycle {c}",
                hint="The ranks drew different A or hold different W: same seed on every rank, model wrapped by "
                     "relora_ext.wrap before DDP, optimizer built from the DDP module's parameters.")
            self._ranks_checked = True
        self.cycles_done += 1
        self.last_prune_kept = kept
        self.last_prune_total = total

    def _prune_layer(self, li: int, layer: LoRALinear, cycle: int, guard_sharded: Dict[Any, list]):
        from . import distributed as D
        from . import ops

        kept = total = 0
        j = 0
        for p in (layer.lora_A, layer.lora_B):
            st = self.optimizer.state.get(p)
            if not st:
                continue
            for key in sorted(st, key=str):
                t = st[key]
                if not isinstance(t, torch.Tensor) or t.shape != p.shape or not t.is_floating_point():
                    continue
                if D.is_dtensor(t):
                    k = D.prune_sharded_(t, self.prune_ratio, mode=self.prune, seed=self.seed,
                                         offset=prune_offset(li, j, cycle))
                elif self.prune == "random":
                    k = ops.prune_(t, self.prune_ratio, mode="random", seed=self.seed,
                                  offset=prune_offset(li, j, cycle))
                else:
                    k = ops.prune_(t, self.prune_ratio, mode=self.prune)
                kept += int(k)
                total += t.numel()
                j += 1
            if self.prune_guard and self.prune != "reset":
                m = st.get("exp_avg")
                if D.is_dtensor(m):
                    _, group = D._shard_layout(m, "the optimizer state")
                    zeroed = self._guard_first_moment({k: v.to_local() if D.is_dtensor(v) else v for k, v in st.items()})
                    if group is None:
                        kept -= zeroed
                    else:
                        guard_sharded.setdefault(id(group), (group, []))[1].append(zeroed)
                else:
                    kept -= self._guard_first_moment(st)
        return kept, total

    @staticmethod
    def _guard_first_moment(st) -> int:
        """Zero ``exp_avg`` where every second-moment state is zero; returns how many entries that zeroed."""
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

    # -- (de)serialisation ------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"relora"`` entry with this wrapper's counters.

        Example: ``torch.save(opt.state_dict(), "opt.pt")``; later ``opt.load_state_dict(torch.load(...))``.
        """
        sd = dict(self.optimizer.state_dict())
        sd["relora"] = {
            "steps_taken": self.steps_taken,
            "cycles_done": self.cycles_done,
            "last_prune_kept": self.last_prune_kept,
            "last_prune_total": self.last_prune_total,
            "reset_every": self.reset_every,
            "prune_ratio": self.prune_ratio,
            "prune": self.prune,
            "seed": self.seed,
            "rounding": self.rounding,
            "prune_guard": self.prune_guard,
        }
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a dict made by :meth:`state_dict`: the wrapped optimizer's state and this wrapper's counters.

        Raises :class:`ValueError` (before loading anything) if the dict was saved with other settings
        (``reset_every``, ``seed``, ``prune``, ...): resuming must continue the same cycle. A plain state dict
        of the wrapped optimizer's type (no ``"relora"`` entry) is accepted as well; the counters then
        restart from zero.
        """
        sd = dict(state_dict)
        meta = sd.pop("relora", None) or {}
        self._check_saved(meta, "ReLoRAOptimizer.load_state_dict")
        self.optimizer.load_state_dict(sd)
        self._set_counters(meta)

    _SETTINGS = ("reset_every", "prune_ratio", "prune", "seed", "rounding", "prune_guard")
    _COUNTERS = ("steps_taken", "cycles_done", "last_prune_kept", "last_prune_total")

    def _check_saved(self, meta: Dict[str, Any], where: str) -> None:
        """Refuse saved wrapper state (the ``"relora"`` entry) that cannot continue this optimizer's cycle."""
        for k in self._SETTINGS:
            if k in meta and meta[k] != getattr(self, k):
                raise ValueError(
                    f"{where}: the state was saved with {k}={meta[k]!r} but this optimizer has "
                    f"{k}={getattr(self, k)!r}; build the ReLoRAOptimizer with the saved settings"
                )
        for k in self._COUNTERS:
            v = meta.get(k, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{where}: {k} must be an int >= 0, got {v!r}")

    def _set_counters(self, meta: Dict[str, Any]) -> None:
        for k in self._COUNTERS:
            setattr(self, k, meta.get(k, 0))
