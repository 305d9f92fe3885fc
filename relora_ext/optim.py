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

import math
from collections import OrderedDict
from typing import Any, Dict

import torch
from torch import nn

from . import distributed as D
from . import sst
from ._checks import CycleRefused, check_bool, is_dtensor
from .cycle import CycleSettings, SSTLayer, backend_for, cycled_layers, prune_offset, reset_offset, run_cycle

__all__ = ["ReLoRAOptimizer", "check_optimizer_state", "reset_offset", "prune_offset"]

#: The wrapper's counters, saved in ``state_dict()["relora"]`` beside the settings.
COUNTERS = ("steps_taken", "cycles_done", "last_cycle_step", "last_prune_kept", "last_prune_total")


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
            literal pruning of the method (and of the reference code) (every state tensor keeps exactly
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
        self.settings = CycleSettings(reset_every=reset_every, prune_ratio=prune_ratio, prune=prune, seed=seed,
                                      rounding=rounding, prune_guard=prune_guard)
        check_bool(where, "check_ranks", check_ranks)
        layers = cycled_layers(model)
        if not layers:
            raise ValueError(
                f"{where}: model ({type(model).__name__}) has no LoRALinear layer; call relora_ext.wrap(model, r=...) "
                "before building the optimizer"
            )
        backends = [backend_for(layer) for _, layer in layers]  # local, sharded or SST: once per layer
        for (name, layer), backend in zip(layers, backends):
            if backend is SSTLayer and any(is_dtensor(t) for t in (*layer.parameters(), *layer.buffers())):
                raise ValueError(f"{where}: layer {name!r}: {sst.FSDP2_REFUSAL}")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for name, layer in layers:
            for pname in layer.trained:
                if id(getattr(layer, pname)) not in held:
                    raise ValueError(
                        f"{where}: the wrapped optimizer does not hold {name}.{pname} "
                        f"(shape {tuple(getattr(layer, pname).shape)}); build it from model.parameters() after "
                        "relora_ext.wrap(model, ...), so that it trains the adapters"
                    )
        for name, layer in layers:
            for pname, p in layer.named_parameters(recurse=False):
                dt = p.dtype
                if not dt.is_floating_point or dt == torch.float64:
                    raise TypeError(
                        f"{where}: layer {name!r}: {pname} is {dt}; the ReLoRA* cycle merges float32, bfloat16 or "
                        "float16 weights only (convert the model, e.g. model.float())")
        self.optimizer = optimizer
        self.model = model
        self.model_layers = layers
        self._backends = backends
        self._sst_layers = [layer for (_, layer), b in zip(layers, backends) if b is SSTLayer]
        self._paths = _module_paths(model, [name for name, _ in layers])
        self._slots = _parameter_slots(model, layers)
        owner_paths = _module_paths(model, [q.rpartition(".")[0] for q, _, _, _ in self._slots])
        self._edges = list({(id(p), part): (p, part, c) for path in (*self._paths.values(), *owner_paths.values())
                            for p, part, c in path}.values())
        self.process_group = process_group
        self.check_ranks = check_ranks
        self._ranks_checked = False
        self.steps_taken = 0
        self.cycles_done = 0
        self.last_cycle_step = 0
        self.last_prune_kept = 0
        self.last_prune_total = 0

        # What torch.optim.Optimizer.__init__ sets up for hooks; param_groups/state/defaults are the wrapped
        # optimizer's (delegated), so that there is one copy of each.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._cycle_hooks = OrderedDict()
        self._patch_step_function()

    # -- settings (read-only views of self.settings) --------------------------------------------------

    reset_every = property(lambda self: self.settings.reset_every, doc="Cycle length ``T`` in optimizer steps.")
    prune_ratio = property(lambda self: self.settings.prune_ratio, doc="Share of state entries a prune zeroes.")
    prune = property(lambda self: self.settings.prune, doc="Prune mode.")
    seed = property(lambda self: self.settings.seed, doc="Key of every reset / random-prune draw.")
    rounding = property(lambda self: self.settings.rounding, doc="Rounding of the merge into ``W``.")
    prune_guard = property(lambda self: self.settings.prune_guard, doc="Whether the first-moment guard runs.")

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
        fields = ", ".join(f"{k}={v!r}" for k, v in self.settings.to_dict().items())
        return f"ReLoRAOptimizer({fields}, layers={len(self.model_layers)},\n{inner}\n)"

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or set to ``None``) the gradients, as the wrapped optimizer does."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer (see :meth:`torch.optim.Optimizer.add_param_group`)."""
        self.optimizer.add_param_group(param_group)

    # -- stepping -----------------------------------------------------------------------------------

    def step(self, closure=None):
        """Step the wrapped optimizer; after every ``reset_every``-th step, run the ReLoRA* cycle.

        Returns what the wrapped optimizer's ``step`` returns (the closure's loss, if given). If the cycle
        is refused (:class:`~relora_ext.cycle.CycleRefused`, e.g. a NaN in an adapter), the optimizer step
        itself stands and counts, the cycle does not: weights, adapters, optimizer state, ``cycles_done``
        are as after a plain step, the next cycle draws the streams this one would have drawn, and
        :class:`~relora_ext.schedule.JaggedCosineLR` does not re-warm for it.
        """
        if self.steps_taken == 0:
            self._check_layers_unchanged("step 1")
        self._check_layers_attached(f"step {self.steps_taken + 1}")
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        if self._sst_layers:  # SST: unit-length active directions, Σ >= 0 (one native call for every layer)
            sst.renormalize_(self._sst_layers)
        self.steps_taken += 1
        if self.steps_taken % self.settings.reset_every == 0:
            self.restart()
        return loss

    @torch.no_grad()
    def restart(self) -> None:
        """Run one cycle now (merge, reset, prune on every layer) and count it; ``step()`` calls it.

        All or nothing (see :mod:`relora_ext.cycle`): every layer and state tensor is checked first, and a
        problem anywhere raises :class:`~relora_ext.cycle.CycleRefused` naming the layer, with nothing changed
        (``cycles_done`` included). Layers wrapped after this optimizer was built are refused too.

        Distributed (``torch.distributed`` initialised, more than one rank in ``process_group``): the ranks
        vote before changing anything, so they refuse together; at the first cycle this optimizer runs, every
        rank checks that the others have the same setup (seed, settings, adapter layout) and, after the
        reset, the same ``A`` draws (and merged ``W`` when replicated); a difference raises
        :class:`relora_ext.distributed.ConsistencyError` on every rank (``check_ranks=False`` skips it).
        Every rank must call ``step()``/``restart()`` together.
        """
        c = self.cycles_done
        self._check_layers_attached(f"cycle {c}")
        self._check_layers_unchanged(f"cycle {c}")
        multi = D.is_distributed(self.process_group)
        check = multi and self.check_ranks and not self._ranks_checked
        if check:
            D.check_consistency(
                D.fingerprint(self), group=self.process_group, what=f"ReLoRA* setup at cycle {c}",
                hint="Every rank must build the same model, call relora_ext.wrap with the same arguments and pass "
                     "the same seed and settings to ReLoRAOptimizer.")
        result = run_cycle(self.model_layers, self._backends, self.optimizer.state, self.settings, c,
                           group=self.process_group, distributed=multi)
        if check:
            D.check_consistency(
                D.draw_hashes(self, result.full_A), group=self.process_group,
                what=f"reset draw / merged weight at cycle {c}",
                hint="The ranks drew different A or hold different W: same seed on every rank, model wrapped by "
                     "relora_ext.wrap before DDP, optimizer built from the DDP module's parameters.")
            self._ranks_checked = True
        self.cycles_done += 1
        self.last_cycle_step = self.steps_taken
        self.last_prune_kept = result.kept
        self.last_prune_total = result.total
        info = {"cycle": c, "step": self.steps_taken, "kept": result.kept, "total": result.total}
        for hook in self._cycle_hooks.values():
            hook(self, info)

    def register_cycle_hook(self, hook):
        """Call ``hook(optimizer, info)`` after every cycle that ran; ``info`` is ``{"cycle", "step", "kept",
        "total"}``. Returns a handle whose ``remove()`` unregisters it.

        Example: ``opt.register_cycle_hook(lambda opt, info: print("cycle", info["cycle"], info["kept"]))``.
        """
        from torch.utils.hooks import RemovableHandle

        handle = RemovableHandle(self._cycle_hooks)
        self._cycle_hooks[handle.id] = hook
        return handle

    def _check_layers_attached(self, when: str) -> None:
        """Refuse to go on if a layer this optimizer cycles, or one of its trained parameters, left the model
        (unwrapped, replaced, ``load_state_dict(assign=True)``): the optimizer would step and cycle what the
        model no longer computes with. One identity test per module on the way to each layer and to the
        module holding each trained parameter, and one per parameter slot (cheap enough for every step)."""
        if all(parent._modules.get(name) is child for parent, name, child in self._edges) and all(
                owner._parameters.get(key) is p for _, owner, key, p in self._slots):
            return
        gone = [n for n, path in self._paths.items() if any(p._modules.get(k) is not c for p, k, c in path)]
        if not gone:
            gone = [where for where, owner, key, p in self._slots if owner._parameters.get(key) is not p
                    or self.model.get_submodule(where.rpartition(".")[0]) is not owner]
        raise CycleRefused(
            f"ReLoRAOptimizer: {when} refused, nothing was changed: {gone} are no longer in the model (unwrapped "
            "or replaced since this optimizer was built: it would step and cycle the old ones); build a new "
            "optimizer for the model as it is now")

    def _check_layers_unchanged(self, when: str) -> None:
        """Refuse to go on if the model gained LoRALinear layers this optimizer does not know."""
        known = {id(layer) for _, layer in self.model_layers}
        new = [name for name, layer in cycled_layers(self.model) if id(layer) not in known]
        if new:
            raise CycleRefused(
                f"ReLoRAOptimizer: {when} refused, nothing was changed: layer(s) {new} were wrapped after this "
                "optimizer was built, so they would never be cycled; wrap the model first, then build the "
                "optimizer and the ReLoRAOptimizer")

    # -- (de)serialisation ------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"relora"`` entry: settings, counters, the inner
        optimizer's type. Runs the hooks registered with ``register_state_dict_pre_hook``/``post_hook``.

        Example: ``torch.save(opt.state_dict(), "opt.pt")``; later ``opt.load_state_dict(torch.load(...))``.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = dict(self.optimizer.state_dict())
        sd["relora"] = {**self.settings.to_dict(), **{k: getattr(self, k) for k in COUNTERS},
                        "optimizer_type": type(self.optimizer).__qualname__}
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def check_state_dict(self, state_dict: Dict[str, Any], where: str = "ReLoRAOptimizer.load_state_dict") -> None:
        """Raise :class:`ValueError` if :meth:`load_state_dict` would refuse ``state_dict``; changes nothing.

        Refused: other settings (``reset_every``, ``seed``, ``prune``, ...), another inner optimizer type,
        other parameter groups (count, sizes, hyper-parameter keys), state tensors shaped unlike their
        parameters, malformed counters.
        """
        meta = state_dict.get("relora") if isinstance(state_dict, dict) else None
        meta = meta or {}
        self.settings.check_saved(meta, where)
        saved_type = meta.get("optimizer_type")
        if saved_type is not None and saved_type != type(self.optimizer).__qualname__:
            raise ValueError(f"{where}: the state was saved from a {saved_type} but this ReLoRAOptimizer wraps a "
                             f"{type(self.optimizer).__qualname__}")
        for k in COUNTERS:
            v = meta.get(k, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{where}: {k} must be an int >= 0, got {v!r}")
        check_optimizer_state(self.optimizer, {k: v for k, v in state_dict.items() if k != "relora"}, where)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a dict made by :meth:`state_dict`: the wrapped optimizer's state and this wrapper's counters.

        Checked in full first (:meth:`check_state_dict`): a refused load raises :class:`ValueError` and changes
        nothing. A plain state dict of the wrapped optimizer's type (no ``"relora"`` entry) is accepted as
        well; the counters then restart from zero. Runs the load-state-dict pre/post hooks.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        self.check_state_dict(state_dict)
        sd = dict(state_dict)
        meta = sd.pop("relora", None) or {}
        self.optimizer.load_state_dict(sd)
        self._set_counters(meta)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _set_counters(self, meta: Dict[str, Any]) -> None:
        for k in COUNTERS:
            setattr(self, k, meta.get(k, 0))
        if "last_cycle_step" not in meta:  # saved before it existed: the cycles ran on schedule
            self.last_cycle_step = self.cycles_done and self.steps_taken // self.reset_every * self.reset_every


def _parameter_slots(model: nn.Module, layers):
    """``(qualified name, owning module, key, parameter)`` of every parameter the layers train, found where
    the model holds it (a PEFT view's factors live in the PEFT layer's ``lora_A``/``lora_B`` dicts)."""
    where = {}
    for mname, mod in model.named_modules():
        for key, p in mod._parameters.items():
            if p is not None:
                where.setdefault(id(p), (f"{mname}.{key}" if mname else key, mod, key))
    slots = []
    for _, layer in layers:
        for pname in layer.trained:
            p = getattr(layer, pname)
            if id(p) in where:
                slots.append((*where[id(p)], p))
    return slots


def _module_paths(model: nn.Module, names):
    """``{name: [(parent, child name, child), ...]}``: the modules on the way from ``model`` to each layer
    (a PEFT layer's view is reached through the PEFT module it reads)."""
    paths = {}
    for name in filter(None, names):  # "" is the model itself
        parent, path = model, []
        for part in name.split("."):
            child = parent._modules[part]
            path.append((parent, part, child))
            parent = child
        paths[name] = path
    return paths


def check_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: Any, where: str) -> None:
    """Raise :class:`ValueError` if ``optimizer.load_state_dict(state_dict)`` would fail or load state that
    does not fit: another optimizer's hyper-parameter keys, other group sizes, hyper-parameters of another
    kind or not finite, state shaped unlike its parameter or of another dtype, a ``step`` that is not a finite
    count, an entry shaped like its parameter for some parameters and not for others. Changes nothing.
    (A :class:`~relora_ext.optim.ReLoRAOptimizer` checks its settings too.)"""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"{where}: expected an optimizer state dict with 'state' and 'param_groups', got "
                         f"{type(state_dict).__name__}")
    groups, saved_groups = optimizer.param_groups, state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(f"{where}: the optimizer state has {len(saved_groups)} parameter groups, the optimizer "
                         f"has {len(groups)}")
    params = {}
    for i, (g, sg) in enumerate(zip(groups, saved_groups)):
        if len(g["params"]) != len(sg["params"]):
            raise ValueError(f"{where}: parameter group {i} holds {len(sg['params'])} parameters in the state but "
                             f"{len(g['params'])} in the optimizer")
        missing = sorted(set(g) - set(sg) - {"params"})
        if missing:
            raise ValueError(f"{where}: parameter group {i} of the state lacks {missing}: it was saved from another "
                             f"optimizer type than {type(optimizer).__name__}")
        for k in sorted(set(g) & set(sg) - {"params"}):
            if not _same_kind(g[k], sg[k]) or not _finite(sg[k]):
                raise ValueError(f"{where}: parameter group {i}: {k!r} is {sg[k]!r} ({type(sg[k]).__name__}) in the "
                                 f"state, the optimizer holds {g[k]!r} ({type(g[k]).__name__})")
        params.update(zip(sg["params"], g["params"]))
    shaped: Dict[Any, Dict[bool, Any]] = {}  # state key -> {shaped like its parameter?: an example parameter id}
    for pid, st in state_dict["state"].items():
        p = params.get(pid)
        if p is None:
            raise ValueError(f"{where}: the optimizer state holds parameter id {pid!r}, which no group lists")
        if not isinstance(st, dict):
            raise ValueError(f"{where}: the optimizer state of parameter {pid} is a {type(st).__name__}, not a dict")
        for k, v in st.items():
            if k == "step" and not _is_count(v):
                raise ValueError(f"{where}: optimizer state 'step' of parameter {pid} must be a finite count >= 0 "
                                 f"(a number or a one-element tensor), got {v!r:.60}")
            if p.numel() > 1 and isinstance(v, torch.Tensor):
                shaped.setdefault(k, {}).setdefault(v.dim() > 0, pid)
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"{where}: optimizer state {k!r} of parameter {pid} has shape {tuple(v.shape)} "
                                 f"but the parameter has shape {tuple(p.shape)}")
            held = optimizer.state.get(p, {}).get(k)
            want = held.dtype if isinstance(held, torch.Tensor) else p.dtype
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.dtype != want:
                raise ValueError(f"{where}: optimizer state {k!r} of parameter {pid} is {v.dtype}, expected {want} "
                                 "(the dtype of its parameter / of the state the optimizer holds)")
    for k, kinds in shaped.items():
        if True in kinds and False in kinds:
            raise ValueError(f"{where}: optimizer state {k!r} is shaped like its parameter for parameter {kinds[True]} "
                             f"but not for parameter {kinds[False]}")


def _is_count(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.is_complex() or v.dtype == torch.bool:
            return False
        v = v.item()
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _finite(v: Any) -> bool:
    """No NaN or infinity among the numbers of a hyper-parameter (``lr``, ``betas``, ...)."""
    if isinstance(v, (list, tuple)):
        return all(_finite(x) for x in v)
    if isinstance(v, torch.Tensor):
        return bool(torch.isfinite(v).all()) if v.dtype.is_floating_point else True
    return not isinstance(v, float) or math.isfinite(v)


def _same_kind(current: Any, saved: Any) -> bool:
    """Whether a saved hyper-parameter can stand for the current one: a number for a number (a bool for a
    bool), a sequence for a sequence (Adam's betas), anything where the current value is ``None`` or not plain."""
    if isinstance(current, bool):
        return isinstance(saved, bool)
    if isinstance(current, (int, float)):
        return isinstance(saved, (int, float, torch.Tensor)) and not isinstance(saved, bool)
    if isinstance(current, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(current) and all(
            _same_kind(c, v) for c, v in zip(current, saved))
    if isinstance(current, str):
        return isinstance(saved, str)
    return True
