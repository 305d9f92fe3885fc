"""Checkpoints for exact resume: :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`atomic_save`.

A checkpoint holds the model, the optimizer (with :class:`~relora_ext.optim.ReLoRAOptimizer`'s counters),
the scheduler, an optional :class:`torch.amp.GradScaler`, the random-number states that training
consumes (torch's CPU generator, CUDA generators if any, Python's :mod:`random`) and any extra
picklable-safe data (e.g. a data generator's ``get_state()``). The ReLoRA* resets themselves need no
saved RNG: they are a pure function of (seed, layer, cycle). Resuming mid-cycle on CPU gives
bit-identical subsequent losses compared with an uninterrupted run.

Example::

    >>> save_checkpoint("runs/ckpt.pt", model=model, optimizer=opt, scheduler=sched, extra={"step": step})
    >>> extra = load_checkpoint("runs/ckpt.pt", model=model, optimizer=opt, scheduler=sched)
    >>> step = extra["step"]
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Dict, Optional, Union

import torch

__all__ = ["atomic_save", "save_checkpoint", "load_checkpoint", "get_rng_state", "set_rng_state"]

FORMAT = "relora_ext.checkpoint/1"
PathLike = Union[str, "os.PathLike[str]"]


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` atomically: a reader sees the old file or the complete new one, never half.

    Writes a temporary file in ``path``'s directory, flushes and ``fsync``\\s it, renames it over ``path``
    with :func:`os.replace` (atomic on POSIX and Windows) and ``fsync``\\s the directory. On any error the
    temporary file is removed and ``path`` is left as it was.

    Example: ``atomic_save({"step": 3, "w": torch.ones(2)}, "runs/x.pt")``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def get_rng_state() -> Dict[str, Any]:
    """The random states training consumes: torch CPU, every CUDA device (if available), Python ``random``.

    Example: ``state = get_rng_state(); ...; set_rng_state(state)``.
    """
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (missing entries are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: PathLike,
    *,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    scaler: Optional[Any] = None,
    extra: Optional[Dict[str, Any]] = None,
    rng: bool = True,
) -> None:
    """Write model, optimizer, scheduler, scaler, RNG states and ``extra`` to ``path`` atomically.

    Args:
        path: the file to (over)write, via :func:`atomic_save`.
        model: its ``state_dict()`` is saved (a wrapped model saves ``weight``, ``lora_A``, ``lora_B``, ...).
        optimizer, scheduler, scaler: anything with ``state_dict()``; ``None`` to skip.
        extra: a dict of tensors, numbers, strings, lists/dicts of them (loadable with
            ``weights_only=True``), e.g. ``{"step": step, "data_rng": gen.get_state()}``.
        rng: also save :func:`get_rng_state` (default ``True``; needed for bit-identical resume when
            dropout or random data order use the global generators).

    Example: ``save_checkpoint("runs/demo/ckpt.pt", model=model, optimizer=opt, scheduler=sched)``.
    """
    ckpt: Dict[str, Any] = {"format": FORMAT, "model": model.state_dict()}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        ckpt["scaler"] = scaler.state_dict()
    if rng:
        ckpt["rng"] = get_rng_state()
    ckpt["extra"] = dict(extra) if extra else {}
    atomic_save(ckpt, path)


def load_checkpoint(
    path: PathLike,
    *,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    scaler: Optional[Any] = None,
    map_location: Any = "cpu",
    strict: bool = True,
    rng: bool = True,
) -> Dict[str, Any]:
    """Load a :func:`save_checkpoint` file into the given objects; returns its ``extra`` dict.

    Build the objects exactly as for the original run (same :func:`relora_ext.wrap` call, optimizer over
    the same parameters, same scheduler settings), then call this. Uses ``torch.load(weights_only=True)``.

    Raises:
        ValueError: the file is not a relora_ext checkpoint, or it lacks a state asked for (e.g. an
            ``optimizer`` was passed but none was saved).

    Example: ``extra = load_checkpoint("runs/demo/ckpt.pt", model=model, optimizer=opt, scheduler=sched)``.
    """
    ckpt = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"load_checkpoint: {os.fspath(path)!r} is not a {FORMAT} checkpoint (format: {got!r})")
    targets = [(name, obj) for name, obj in (("optimizer", optimizer), ("scheduler", scheduler),
                                             ("scaler", scaler)) if obj is not None]
    for name, _ in targets:  # refuse before anything is loaded, so that a refused load changes nothing
        if name not in ckpt:
            raise ValueError(f"load_checkpoint: {name} given but {os.fspath(path)!r} holds no {name} state")
    model.load_state_dict(ckpt["model"], strict=strict)
    for name, obj in targets:
        obj.load_state_dict(ckpt[name])
    if rng and "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    return ckpt.get("extra", {})
