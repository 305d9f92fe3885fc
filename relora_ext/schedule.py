"""The jagged cosine learning-rate schedule of ReLoRA: :class:`JaggedCosineLR` and :func:`jagged_cosine`."""

from __future__ import annotations

import math
from typing import Optional
import warnings

from torch.optim.lr_scheduler import LRScheduler

from ._checks import check_float, check_int

__all__ = ["JaggedCosineLR", "jagged_cosine"]

_WHERE = "JaggedCosineLR"


def jagged_cosine(t: int, *, total_steps: int, warmup_steps: int, cycle_length: int, restart_warmup_steps: int,
                  min_lr_ratio: float = 0.1, restarted: bool = True) -> float:
    r"""The learning-rate factor at step ``t`` (optimizer steps already taken), the reference ReLoRA code's formula exactly.

    With ``W0 = warmup_steps``, ``R = cycle_length``, ``Wr = restart_warmup_steps``, ``N = total_steps``,
    ``m = min_lr_ratio``::

        cos(t)    = m + (1 − m) · ½ · (1 + cos(π · (t − W0) / (N − W0)))
        factor(t) = t / W0                                  if t < W0
                  = ((t mod R) / Wr) · cos(⌊t/R⌋·R + Wr)    if t ≥ R and (t mod R) < Wr
                  = cos(t)                                  otherwise

    This is the formula of the reference ReLoRA code (``adjust_step = 0``), so the first step after each
    reset runs at learning rate 0 and the rate ramps linearly back up to the cosine envelope. For
    ``t > N`` (past the planned end) the factor stays at the floor ``m`` instead of following the cosine
    back up. ``restarted=False`` says that the reset at ``⌊t/R⌋·R`` did not happen (a refused cycle): no
    re-warmup then, the factor is ``cos(t)``.

    Example::

        >>> jagged_cosine(0, total_steps=100, warmup_steps=10, cycle_length=50, restart_warmup_steps=5)
        0.0
        >>> jagged_cosine(10, total_steps=100, warmup_steps=10, cycle_length=50, restart_warmup_steps=5)
        1.0
    """
    n, w0, r, wr, m = total_steps, warmup_steps, cycle_length, restart_warmup_steps, min_lr_ratio

    def cos_env(s: int) -> float:
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * (s - w0) / (n - w0)))

    if t < w0:
        return t / w0
    if t > n:
        return m
    if t >= r and (t % r) < wr and restarted:
        return ((t % r) / wr) * cos_env((t // r) * r + wr)
    return cos_env(t)


class JaggedCosineLR(LRScheduler):
    r"""ReLoRA's jagged cosine schedule: linear warmup, cosine decay, and a short linear re-warmup after
    every reset.

    Each parameter group's learning rate is ``initial_lr · factor(t)`` with ``factor`` given by
    :func:`jagged_cosine` (the reference formula, exact). ``t`` is:

    - for a :class:`~relora_ext.optim.ReLoRAOptimizer`, its ``steps_taken`` — the optimizer steps that
      really happened. A step skipped by :class:`torch.amp.GradScaler` (inf/NaN gradients) advances
      neither the cycle nor the schedule, so the re-warmups stay aligned with the resets;
    - for any other optimizer, the number of :meth:`step` calls (``last_epoch``), as usual.

    Call :meth:`step` once after every ``optimizer.step()``, as with any PyTorch scheduler.

    Args:
        optimizer: the optimizer (normally the :class:`~relora_ext.optim.ReLoRAOptimizer`).
        total_steps: ``N``, the planned number of optimizer steps, ``> warmup_steps``.
        warmup_steps: ``W0 >= 0``, the first linear warmup (``0``: none). As in the reference code it must
            not exceed ``cycle_length`` (the first reset would come before the warmup is done).
        cycle_length: ``R >= 1``, steps between resets; by default a ReLoRAOptimizer's ``reset_every``
            (a warning is given if one passed differs from it).
        restart_warmup_steps: ``Wr``, ``0 <= Wr <= R``, the re-warmup after each reset (``0``: none).
        min_lr_ratio: ``m`` in ``[0, 1]``, the floor of the cosine.
        last_epoch: as for every :class:`~torch.optim.lr_scheduler.LRScheduler`.

    Example::

        >>> sched = JaggedCosineLR(opt, total_steps=10_000, warmup_steps=500, cycle_length=2_000,
        ...                        restart_warmup_steps=100)
        >>> for batch in loader:
        ...     ...; opt.step(); sched.step(); opt.zero_grad()
    """

    def __init__(self, optimizer, *, total_steps: int, warmup_steps: int, restart_warmup_steps: int,
                 cycle_length: Optional[int] = None, min_lr_ratio: float = 0.1, last_epoch: int = -1) -> None:
        reset_every = getattr(optimizer, "reset_every", None)
        if cycle_length is None:
            if reset_every is None:
                raise ValueError("JaggedCosineLR: cycle_length is needed for an optimizer that is not a "
                                 f"ReLoRAOptimizer (got {type(optimizer).__name__})")
            cycle_length = reset_every
        self.__dict__.update(_checked_settings(_WHERE, total_steps=total_steps, warmup_steps=warmup_steps,
                                               cycle_length=cycle_length, restart_warmup_steps=restart_warmup_steps,
                                               min_lr_ratio=min_lr_ratio))
        if self.total_steps <= self.cycle_length:
            warnings.warn(
                f"JaggedCosineLR: total_steps={self.total_steps} <= cycle_length={self.cycle_length}: no reset "
                "happens within the run, so this is plain LoRA training", stacklevel=2)
        if reset_every is not None and reset_every != self.cycle_length:
            warnings.warn(
                f"JaggedCosineLR: cycle_length={self.cycle_length} differs from the optimizer's "
                f"reset_every={reset_every}; the re-warmups will not follow the resets",
                stacklevel=2,
            )
        super().__init__(optimizer, last_epoch)

    def check_state_dict(self, state_dict, where: str = "JaggedCosineLR.load_state_dict") -> None:
        """Raise :class:`ValueError` if :meth:`load_state_dict` would load settings the constructor refuses, a
        ``base_lrs`` of another length than the optimizer's groups or not finite, or a bad ``last_epoch``;
        changes nothing."""
        try:
            if not isinstance(state_dict, dict):
                raise ValueError(f"{where}: expected a dict, got {type(state_dict).__name__}")
            _checked_settings(where, **{k: state_dict.get(k, getattr(self, k)) for k in _SETTINGS})
            base = state_dict.get("base_lrs", self.base_lrs)
            if not isinstance(base, (list, tuple)) or len(base) != len(self.optimizer.param_groups):
                raise ValueError(f"{where}: base_lrs must list {len(self.optimizer.param_groups)} rates (one per "
                                 f"parameter group), got {base!r:.80}")
            for lr in base:
                check_float(where, "base_lrs[i]", lr, lo=0.0)
            check_int(where, "last_epoch", state_dict.get("last_epoch", self.last_epoch), lo=-1)
        except TypeError as e:
            raise ValueError(str(e)) from None

    def load_state_dict(self, state_dict) -> None:
        """As :meth:`torch.optim.lr_scheduler.LRScheduler.load_state_dict`, after :meth:`check_state_dict`."""
        self.check_state_dict(state_dict)
        super().load_state_dict(state_dict)

    def _t(self) -> int:
        steps = getattr(self.optimizer, "steps_taken", None)
        if steps is not None and hasattr(self.optimizer, "reset_every"):
            return int(steps)
        return self.last_epoch

    def factor(self, t: int) -> float:
        """The factor at step ``t`` for this schedule's settings (see :func:`jagged_cosine`). With a
        :class:`~relora_ext.optim.ReLoRAOptimizer`, no re-warmup follows a cycle that it refused."""
        last = getattr(self.optimizer, "last_cycle_step", None)
        restarted = last is None or last >= t // self.cycle_length * self.cycle_length
        return jagged_cosine(t, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                             cycle_length=self.cycle_length, restart_warmup_steps=self.restart_warmup_steps,
                             min_lr_ratio=self.min_lr_ratio, restarted=restarted)

    def get_lr(self):
        f = self.factor(self._t())
        return [base * f for base in self.base_lrs]


_SETTINGS = ("total_steps", "warmup_steps", "cycle_length", "restart_warmup_steps", "min_lr_ratio")


def _checked_settings(where: str, *, total_steps, warmup_steps, cycle_length, restart_warmup_steps,
                      min_lr_ratio) -> dict:
    """The schedule's settings, checked alone and against each other (the constructor's and a load's rules)."""
    total_steps = check_int(where, "total_steps", total_steps, lo=1)
    warmup_steps = check_int(where, "warmup_steps", warmup_steps, lo=0)
    cycle_length = check_int(where, "cycle_length", cycle_length, lo=1)
    restart_warmup_steps = check_int(where, "restart_warmup_steps", restart_warmup_steps, lo=0)
    if warmup_steps >= total_steps:
        raise ValueError(f"{where}: warmup_steps must be < total_steps ({total_steps}), got {warmup_steps}")
    if warmup_steps > cycle_length:
        raise ValueError(f"{where}: warmup_steps must be <= cycle_length ({cycle_length}) so that the first reset "
                         f"comes after the warmup, got {warmup_steps}")
    if restart_warmup_steps > cycle_length:
        raise ValueError(f"{where}: restart_warmup_steps must be <= cycle_length ({cycle_length}), "
                         f"got {restart_warmup_steps}")
    min_lr_ratio = check_float(where, "min_lr_ratio", min_lr_ratio, lo=0.0, hi=1.0)
    return dict(total_steps=total_steps, warmup_steps=warmup_steps, cycle_length=cycle_length,
                restart_warmup_steps=restart_warmup_steps, min_lr_ratio=min_lr_ratio)
