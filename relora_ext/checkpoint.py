"""Checkpoints for exact resume, all or nothing: :func:`save_checkpoint`, :func:`load_checkpoint` (one
file), :func:`save_sharded`, :func:`load_sharded` (a directory, one shard per rank), :func:`atomic_save`.

A checkpoint holds the model, the optimizer (with :class:`~relora_ext.optim.ReLoRAOptimizer`'s settings
and counters), the scheduler, an optional :class:`torch.amp.GradScaler`, the random-number states that
training consumes (torch's CPU generator, CUDA generators if any, Python's :mod:`random`), the adapter
settings of every :class:`~relora_ext.lora.LoRALinear` (``r``, ``alpha``, ``init_std``) and any extra data
that ``torch.load(weights_only=True)`` can read back (e.g. a data generator's ``get_state()``). The
ReLoRA* resets themselves need no saved RNG: they are a pure function of (seed, layer, cycle). Resuming
mid-cycle on CPU gives bit-identical subsequent losses compared with an uninterrupted run.

Safety: a save is atomic (a reader sees the old file or the whole new one; temporary files that a killed
save left behind are removed by the next save or load); a SHA-256 digest of the content detects a
corrupted file; a load checks the whole checkpoint against the objects it is given (keys, shapes, adapter
settings, optimizer type and parameter groups, ReLoRA* settings) before it loads anything, so a refused
load raises :class:`ValueError` and changes nothing.

Example::

    >>> save_checkpoint("runs/ckpt.pt", model=model, optimizer=opt, scheduler=sched, extra={"step": step})
    >>> extra = load_checkpoint("runs/ckpt.pt", model=model, optimizer=opt, scheduler=sched)
    >>> step = extra["step"]
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import random
import tempfile
from typing import Any, Callable, Dict, Optional, Union

import torch

from .cycle import cycled_layers
from .model import lora_layers
from .optim import COUNTERS, check_optimizer_state

__all__ = [
    "atomic_save", "save_checkpoint", "load_checkpoint", "save_sharded", "load_sharded", "get_rng_state",
    "set_rng_state", "adapter_settings", "save_adapters", "load_adapters",
]

FORMAT = "relora_ext.checkpoint/2"
_OLD_FORMATS = ("relora_ext.checkpoint/1",)  # no digest, no adapter settings: loaded with fewer checks
#: File (inside a :func:`save_sharded` directory) holding the counters, scheduler state and ``extra``.
META_FILE = "relora_meta.pt"
PathLike = Union[str, "os.PathLike[str]"]


# -- files ------------------------------------------------------------------------------------------


def _remove_stale_temporaries(path: str) -> None:
    """Remove the temporary files of :func:`atomic_save` for ``path`` whose writing process is gone."""
    directory, base = os.path.split(os.path.abspath(path))
    for tmp in glob.glob(os.path.join(glob.escape(directory), glob.escape(f".{base}.") + "*.tmp")):
        # ".{base}.{pid}.{random}.tmp" exactly: ".ckpt.1000.pt.{pid}.{random}.tmp" belongs to "ckpt.1000.pt"
        parts = os.path.basename(tmp)[len(base) + 2:-len(".tmp")].split(".")
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        pid = parts[0]
        try:
            os.kill(int(pid), 0)
            continue  # its writer still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, ``fsync`` it and rename it over ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
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


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` atomically: a reader sees the old file or the complete new one, never half.

    Writes a temporary file ``.{name}.{pid}.*.tmp`` in ``path``'s directory, flushes and ``fsync``\\s it,
    renames it over ``path`` with :func:`os.replace` (atomic on POSIX and Windows) and ``fsync``\\s the
    directory. On any error the temporary file is removed and ``path`` is left as it was; the temporary
    files of a killed save (whose process is gone) are removed by the next save.

    Example: ``atomic_save({"step": 3, "w": torch.ones(2)}, "runs/x.pt")``.
    """
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


# -- the safetensors format: tensors in the file, the structure around them as JSON in its metadata ------------


def _to_skeleton(obj: Any, tensors: Dict[str, torch.Tensor], seen: Dict[int, str]) -> Any:
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:  # a tensor held twice (tied weights) is stored once
            t = obj.detach().cpu().contiguous()
            if any(t.untyped_storage().data_ptr() == u.untyped_storage().data_ptr() for u in tensors.values()
                   if t.numel() and u.numel()):
                t = t.clone()  # safetensors stores no two tensors over one memory
            seen[id(obj)] = key = str(len(tensors))
            tensors[key] = t
        return {"T": seen[id(obj)]}
    if isinstance(obj, dict):
        return {"D": [[_to_skeleton(k, tensors, seen), _to_skeleton(v, tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"L" if isinstance(obj, list) else "U": [_to_skeleton(v, tensors, seen) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"save_checkpoint(safetensors=True): cannot store a {type(obj).__name__}")


def _from_skeleton(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "T" in obj:
            return tensors[obj["T"]]
        if "D" in obj:
            return {_from_skeleton(k, tensors): _from_skeleton(v, tensors) for k, v in obj["D"]}
        items = [_from_skeleton(v, tensors) for v in obj.get("L", obj.get("U", []))]
        return items if "L" in obj else tuple(items)
    return obj


def _save_safetensors(obj: Dict[str, Any], path: PathLike) -> None:
    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_to_skeleton(obj, tensors, {}))
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"relora_ext": skeleton}))


def _load_safetensors(path: str, map_location: Any) -> Any:
    from safetensors import safe_open

    device = map_location if isinstance(map_location, str) else "cpu"
    with safe_open(path, framework="pt", device=device) as f:
        skeleton = json.loads((f.metadata() or {})["relora_ext"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _from_skeleton(skeleton, tensors)


def _digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's content: its structure, every value, every tensor's dtype, shape and bytes."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach()
            h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
            if t.numel():
                h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(o, dict):
            h.update(f"D{len(o)};".encode())
            for k, v in o.items():
                walk(k)
                walk(v)
        elif isinstance(o, (list, tuple)):
            h.update(f"{type(o).__name__[0]}{len(o)};".encode())
            for v in o:
                walk(v)
        else:
            h.update(f"{type(o).__name__}:{o!r};".encode())

    walk(obj)
    return h.hexdigest()


def _load_file(path: str, map_location: Any, where: str) -> Any:
    """``torch.load(weights_only=True)`` or the safetensors reader (by the file's first bytes), with a damaged
    file reported as such."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"PK\x03\x04":  # not a zip archive (torch.save): a safetensors file
            return _load_safetensors(path, map_location)
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - zip, pickle and I/O errors of a truncated or corrupted file
        raise ValueError(f"{where}: {path!r} is truncated or corrupted and cannot be read "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _check_loadable(extra: Dict[str, Any], where: str) -> None:
    """Refuse (before writing) ``extra`` values that ``torch.load(weights_only=True)`` could not read back."""
    for key, value in extra.items():
        buf = io.BytesIO()
        try:
            torch.save(value, buf)
            buf.seek(0)
            torch.load(buf, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise TypeError(
                f"{where}: extra[{key!r}] ({type(value).__name__}) could not be loaded back with "
                "torch.load(weights_only=True); store tensors, numbers, strings, and lists/dicts/tuples of them "
                f"({type(e).__name__})") from None


# -- RNG ----------------------------------------------------------------------------------------------


def get_rng_state() -> Dict[str, Any]:
    """The random states training consumes: torch CPU, every CUDA device (if available), Python ``random``.

    Example: ``state = get_rng_state(); ...; set_rng_state(state)``.
    """
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def check_rng_state(state: Any, where: str) -> None:
    """Raise :class:`ValueError` if :func:`set_rng_state` would refuse ``state``; changes nothing (each entry
    is tried on a generator of its own)."""
    if not isinstance(state, dict):
        raise ValueError(f"{where}: the RNG state must be a dict, got {type(state).__name__}")
    try:
        if "torch" in state:
            torch.Generator().set_state(state["torch"])
        if "python" in state:
            py = state["python"]
            random.Random().setstate((py[0], tuple(py[1]), py[2]))
        if "cuda" in state and torch.cuda.is_available():
            cuda = state["cuda"]
            if not isinstance(cuda, (list, tuple)) or len(cuda) != torch.cuda.device_count():
                raise ValueError(f"{len(cuda) if isinstance(cuda, (list, tuple)) else type(cuda).__name__} CUDA "
                                 f"states for {torch.cuda.device_count()} devices")
            for i, t in enumerate(cuda):
                torch.Generator(device=f"cuda:{i}").set_state(t)
    except Exception as e:  # noqa: BLE001 - whatever the generators refuse
        raise ValueError(f"{where}: the checkpoint's RNG state cannot be restored ({type(e).__name__}: {e})") from None


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (missing entries are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- what a checkpoint must match ------------------------------------------------------------------------


def adapter_settings(model: torch.nn.Module) -> Dict[str, Dict[str, Any]]:
    """``{layer name: settings}`` for every adapted layer (:meth:`~relora_ext.adapter.CycledLayer.settings`):
    ``r``, ``alpha``, ``init_std`` and the shape of a LoRALinear or LoRAEmbedding; ``method: "sst"``, ``r``,
    ``weight_dtype`` and the features of an SSTLinear.

    Saved in every checkpoint and compared on load: the same weights under another ``alpha`` compute
    another function. Example: ``adapter_settings(model)["0"]["alpha"]``.
    """
    return {name: layer.settings() for name, layer in cycled_layers(model)}


def _check_model_state(model: torch.nn.Module, saved: Dict[str, Any], strict: bool, where: str) -> None:
    current = model.state_dict()
    if strict:
        missing = sorted(set(current) - set(saved))
        unexpected = sorted(set(saved) - set(current))
        if missing or unexpected:
            raise ValueError(f"{where}: the checkpoint's model state does not match the model: missing keys "
                             f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected keys "
                             f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for k in sorted(set(current) & set(saved)):
        a, b = current[k], saved[k]
        if isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            raise ValueError(f"{where}: {k!r} is a {type(b).__name__} in the checkpoint but a tensor in the model")
        if isinstance(a, torch.Tensor) and tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"{where}: {k!r} has shape {tuple(b.shape)} in the checkpoint but {tuple(a.shape)} "
                             "in the model")
        if isinstance(a, torch.Tensor) and _dtype_kind(a.dtype) != _dtype_kind(b.dtype):
            raise ValueError(f"{where}: {k!r} is {b.dtype} in the checkpoint but {a.dtype} in the model (a copy would "
                             "drop what does not fit)")
    _check_writable_state(current, where)


def _dtype_kind(dtype: torch.dtype) -> str:
    return "complex" if dtype.is_complex else "float" if dtype.is_floating_point else "bool" if dtype == torch.bool \
        else "int"


def _check_writable_state(current: Dict[str, Any], where: str) -> None:
    """The model's tensors must take a copy: no element written twice (an expanded view), and two entries over
    one memory only as the same view (tied weights). Otherwise ``load_state_dict`` would fail halfway or write
    one entry over another."""
    views: Dict[Any, tuple] = {}
    for k, t in current.items():
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.device.type == "meta":
            continue
        if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
            raise ValueError(f"{where}: the model's {k!r} is an expanded view (strides {t.stride()}): loading would "
                             "write its shared elements several times; give it its own memory first")
        key = (t.device, t.untyped_storage().data_ptr())
        view = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if key in views and views[key][1] != view:
            raise ValueError(f"{where}: the model's {k!r} and {views[key][0]!r} share memory as different views: "
                             "loading one would overwrite the other")
        views.setdefault(key, (k, view))


def _check_adapters(model: torch.nn.Module, saved: Any, where: str) -> None:
    if not isinstance(saved, dict):
        raise ValueError(f"{where}: the checkpoint holds no adapter settings (got {type(saved).__name__}); it was "
                         "not written by save_checkpoint")
    current = adapter_settings(model)
    for name in sorted(set(current) | set(saved)):
        if name not in saved:
            raise ValueError(f"{where}: layer {name!r} is a LoRALinear in the model but not in the checkpoint")
        if name not in current:
            raise ValueError(f"{where}: layer {name!r} is a LoRALinear in the checkpoint but not in the model")
        if not isinstance(saved[name], dict) or set(saved[name]) != set(current[name]):
            raise ValueError(f"{where}: layer {name!r} has the settings {saved[name]!r:.80} in the checkpoint; this "
                             f"{type(model).__name__} records {sorted(current[name])}")
        for k, v in saved[name].items():
            if current[name].get(k) != v:
                raise ValueError(f"{where}: layer {name!r} was saved with {k}={v!r} but the model has "
                                 f"{k}={current[name].get(k)!r}; wrap the model with the saved settings")


def _check_like(current: Any, saved: Any, what: str, name: str) -> None:
    """``saved`` must have the structure of ``current`` (a scheduler's or a scaler's own ``state_dict()``): the
    same keys, and values of the same kind (numbers, strings, containers, tensors), so that its
    ``load_state_dict`` cannot fail halfway or load junk."""
    if not isinstance(saved, dict):
        raise ValueError(f"{what} is a {type(saved).__name__}, expected a dict")
    if current and not saved:
        hint = " (a GradScaler saved while disabled, loaded into an enabled one?)" if name == "scaler" else ""
        raise ValueError(f"{what} is empty{hint}")
    if set(saved) != set(current):
        raise ValueError(f"{what} has keys {sorted(map(str, saved))}, this {name} has {sorted(map(str, current))}")
    for k, v in current.items():
        w = saved[k]
        if callable(v):  # a lambda factor and the like: not part of a saved state
            continue
        kinds = [(bool,), (int, float), (str,), (type(None),), (list, tuple), (dict,), (torch.Tensor,)]
        kind = next((t for t in kinds if isinstance(v, t)), None)
        if kind is not None and not isinstance(w, kind) and not (isinstance(v, type(None)) or isinstance(w, type(None))):
            raise ValueError(f"{what}: {k!r} is a {type(w).__name__} ({w!r:.60}), this {name} holds a "
                             f"{type(v).__name__}")
        if kind == (bool,) and not isinstance(w, bool) or kind == (int, float) and isinstance(w, bool):
            raise ValueError(f"{what}: {k!r} is {w!r}, this {name} holds {type(v).__name__} {v!r}")
        if isinstance(w, float) and not math.isfinite(w):
            raise ValueError(f"{what}: {k!r} is {w!r}, not a finite number")
        if kind == (list, tuple) and len(w) != len(v):
            raise ValueError(f"{what}: {k!r} has {len(w)} entries, this {name} holds {len(v)} ({v!r:.60})")


def _check_optimizer(optimizer, state_dict, saved_type: Optional[str], where: str) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    if saved_type is not None and saved_type != type(optimizer).__qualname__:
        raise ValueError(f"{where}: the optimizer state was saved from a {saved_type}, the optimizer given is a "
                         f"{type(optimizer).__qualname__}")
    check = getattr(optimizer, "check_state_dict", None)
    if callable(check):
        check(state_dict, where)
    else:
        check_optimizer_state(inner, state_dict, where)


# -- one-file checkpoints ------------------------------------------------------------------------------


def save_checkpoint(
    path: PathLike,
    *,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    scaler: Optional[Any] = None,
    extra: Optional[Dict[str, Any]] = None,
    rng: bool = True,
    safetensors: bool = False,
) -> None:
    """Write model, optimizer, scheduler, scaler, RNG states and ``extra`` to ``path`` atomically.

    Args:
        path: the file to (over)write, via :func:`atomic_save`.
        model: its ``state_dict()`` is saved (a wrapped model saves ``weight``, ``lora_A``, ``lora_B``, ...),
            and the adapter settings of its LoRALinear layers (:func:`adapter_settings`).
        optimizer, scheduler, scaler: anything with ``state_dict()``; ``None`` to skip. Their types are saved
            and checked on load.
        extra: a dict of tensors, numbers, strings, lists/dicts of them, e.g. ``{"step": step,
            "data_rng": gen.get_state()}``. A value that ``torch.load(weights_only=True)`` could not read back
            is refused with :class:`TypeError` before anything is written.
        rng: also save :func:`get_rng_state` (default ``True``; needed for bit-identical resume when
            dropout or random data order use the global generators).
        safetensors: write a safetensors file (every tensor in it, the structure as JSON in its metadata;
            nothing is unpickled on load) instead of ``torch.save``'s archive. :func:`load_checkpoint` reads
            both.

    Example: ``save_checkpoint("runs/demo/ckpt.pt", model=model, optimizer=opt, scheduler=sched)``.
    """
    extra = dict(extra) if extra else {}
    _check_loadable(extra, "save_checkpoint")
    ckpt: Dict[str, Any] = {"format": FORMAT, "model": model.state_dict(), "adapters": adapter_settings(model)}
    types = {}
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            ckpt[name] = obj.state_dict()
            types[name] = type(obj).__qualname__
    ckpt["types"] = types
    if rng:
        ckpt["rng"] = get_rng_state()
    ckpt["extra"] = extra
    ckpt["sha256"] = _digest(ckpt)
    if safetensors:
        _save_safetensors(ckpt, path)
    else:
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
    Everything is checked before anything is loaded, so a refused load changes nothing.

    Raises:
        ValueError: the file is truncated or corrupted (its SHA-256 digest does not match), is not a
            relora_ext checkpoint, lacks a state asked for, or does not fit the objects given: other model
            keys or shapes (``strict``), other adapter settings (``r``, ``alpha``, ``init_std``, layers),
            another optimizer type or parameter groups, other ReLoRA* settings, another scheduler type.

    Example: ``extra = load_checkpoint("runs/demo/ckpt.pt", model=model, optimizer=opt, scheduler=sched)``.
    """
    where = "load_checkpoint"
    path = os.fspath(path)
    _remove_stale_temporaries(path)
    ckpt = _load_file(path, map_location, where)
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
    if fmt not in (FORMAT, *_OLD_FORMATS):
        raise ValueError(f"{where}: {path!r} is not a {FORMAT} checkpoint (format: {fmt!r})")
    if fmt == FORMAT:
        saved_digest = ckpt.pop("sha256", None)
        if saved_digest != _digest(ckpt):
            raise ValueError(f"{where}: {path!r} is corrupted: its content does not match its SHA-256 digest")
        _check_adapters(model, ckpt.get("adapters"), where)
    types = ckpt.get("types", {})
    if not isinstance(types, dict) or not all(isinstance(v, str) for v in types.values()):
        raise ValueError(f"{where}: the checkpoint's 'types' entry must map names to type names, got {types!r:.80}")
    targets = [(name, obj) for name, obj in (("optimizer", optimizer), ("scheduler", scheduler),
                                             ("scaler", scaler)) if obj is not None]
    for name, obj in targets:
        if name not in ckpt:
            raise ValueError(f"{where}: {name} given but {path!r} holds no {name} state")
    _check_model_state(model, ckpt["model"], strict, where)
    if optimizer is not None:
        _check_optimizer(optimizer, ckpt["optimizer"], types.get("optimizer"), where)
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and types.get(name, type(obj).__qualname__) != type(obj).__qualname__:
            raise ValueError(f"{where}: the {name} state was saved from a {types[name]}, the {name} given is a "
                             f"{type(obj).__qualname__}")
        if obj is not None:
            _check_like(obj.state_dict(), ckpt[name], f"{where}: the {name} state", name)
            check = getattr(obj, "check_state_dict", None)  # a JaggedCosineLR checks its settings
            if callable(check):
                check(ckpt[name], where)
    if rng and "rng" in ckpt:
        check_rng_state(ckpt["rng"], where)
    # Every check passed: load. Should a load still refuse, what was loaded before it is put back: the
    # optimizer, scheduler and scaler first (load_state_dict gives them new state objects, so their old
    # state_dict() is a copy-free undo), the model last (copied in place into its tensors).
    undo = []
    try:
        for name, obj in targets:
            old = obj.state_dict()
            obj.load_state_dict(ckpt[name])
            undo.append((obj, old))
        model.load_state_dict(ckpt["model"], strict=strict)
    except Exception as e:
        for obj, old in reversed(undo):
            obj.load_state_dict(old)
        raise ValueError(f"{where}: refused while loading, nothing was changed: {type(e).__name__}: {e}") from e
    if rng and "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    return ckpt.get("extra", {})


# -- adapters only ------------------------------------------------------------------------------------


def save_adapters(model: torch.nn.Module, path: PathLike) -> None:
    """Write only the adapters, ``lora_A``/``lora_B`` of every LoRALinear, to a safetensors file (atomically),
    with their settings (:func:`adapter_settings`) in its metadata. Small: no frozen weight, no optimizer.

    The adapters hold what was learned since the last cycle; what earlier cycles learned is merged into the
    weights: to share all of it, use :func:`relora_ext.export_peft_adapter`. Example:
    ``save_adapters(model, "runs/adapters.safetensors")``.
    """
    from safetensors.torch import save_file

    tensors = {}
    for name, layer in lora_layers(model):
        for pname in ("lora_A", "lora_B"):
            tensors[f"{name}.{pname}"] = getattr(layer, pname).detach().cpu().contiguous()
    if not tensors:
        raise ValueError(f"save_adapters: model ({type(model).__name__}) has no LoRALinear layer (SST layers have no "
                         "low-rank adapter to export: save merged_state_dict(model) or unwrap(model) instead)")
    meta = {"relora_ext_adapters": json.dumps(adapter_settings(model))}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


@torch.no_grad()
def load_adapters(model: torch.nn.Module, path: PathLike) -> None:
    """Load what :func:`save_adapters` wrote into a model wrapped with the same settings; everything is
    checked (layers, ``r``, ``alpha``, ``init_std``, shapes) before any adapter changes.
    Example: ``load_adapters(model, "runs/adapters.safetensors")``."""
    from safetensors import safe_open


    where = "load_adapters"
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            saved = json.loads((f.metadata() or {}).get("relora_ext_adapters", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{where}: {path!r} is not a readable safetensors file ({type(e).__name__})") from None
    if saved is None:
        raise ValueError(f"{where}: {path!r} was not written by save_adapters (no adapter settings)")
    _check_adapters(model, saved, where)
    layers = lora_layers(model)
    for name, layer in layers:
        for pname in ("lora_A", "lora_B"):
            t, p = tensors.get(f"{name}.{pname}"), getattr(layer, pname)
            if t is None or tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{where}: {name}.{pname} has shape {None if t is None else tuple(t.shape)} in "
                                 f"{path!r}, expected {tuple(p.shape)}")
    for name, layer in layers:
        for pname in ("lora_A", "lora_B"):
            getattr(layer, pname).copy_(tensors[f"{name}.{pname}"])


# -- sharded checkpoints (torch.distributed.checkpoint) ---------------------------------------------


def save_sharded(path: str, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                 extra: Optional[Dict[str, Any]] = None) -> None:
    """Save a (DDP or FSDP2) model and :class:`~relora_ext.optim.ReLoRAOptimizer` with
    :mod:`torch.distributed.checkpoint`: every rank writes its own shards into the directory ``path``.

    Collective. The optimizer state goes through :func:`torch.distributed.checkpoint.state_dict.get_state_dict`
    (fully-qualified parameter names, DTensor shards); the wrapper's counters (``steps_taken``,
    ``cycles_done``, seed, ...), the scheduler's ``state_dict()`` and ``extra`` are saved alongside.
    Example: ``save_sharded("runs/ckpt-100", model=model, optimizer=opt, scheduler=sched, extra={"step": 100})``.
    """
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp


    inner, meta = _split_optimizer(optimizer)
    state = _dcp_state(model, inner)
    # Never half-written: every rank writes into a temporary directory beside `path`, and rank 0 moves the
    # complete checkpoint into place once all ranks are done (a crash leaves the old checkpoint intact).
    final = os.fspath(path).rstrip(os.sep)
    tmp, old = final + ".tmp", final + ".old"
    lead = not dist.is_initialized() or dist.get_rank() == 0
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    dcp.save(state, checkpoint_id=tmp)
    # small non-tensor data: one file written by rank 0 (DCP would flatten the dicts into per-key entries)
    meta_obj = {"relora": meta or {}, "adapters": adapter_settings(model), "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "extra": dict(extra) if extra else {}}
    if lead:
        atomic_save(meta_obj, os.path.join(tmp, META_FILE))
    barrier()
    if lead:
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_sharded(path: str, *, model: torch.nn.Module, optimizer=None, scheduler=None) -> Dict[str, Any]:
    """Load what :func:`save_sharded` wrote into objects built as for the original run (same ``wrap``,
    ``fully_shard``/DDP, optimizer and scheduler settings, same world size for FSDP2 not required: DCP
    reshards). Collective. Returns ``extra``. Example: ``extra = load_sharded(path, model=model, optimizer=opt)``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    inner, _ = _split_optimizer(optimizer)
    saved = torch.load(os.path.join(os.fspath(path), META_FILE), map_location="cpu", weights_only=True)
    if optimizer is not None and optimizer is not inner:  # refuse other settings before loading anything
        optimizer.settings.check_saved(saved["relora"], "load_sharded")
    if "adapters" in saved:
        _check_adapters(model, saved["adapters"], "load_sharded")
    state = _dcp_state(model, inner)
    dcp.load(state, checkpoint_id=os.fspath(path))
    state.update(saved)
    if inner is not None:
        set_state_dict(model, inner, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"])
    if optimizer is not None and optimizer is not inner:
        optimizer._set_counters(state["relora"])
    if scheduler is not None and state["scheduler"]:
        scheduler.load_state_dict(state["scheduler"])
    return state["extra"]


def _dcp_state(model: torch.nn.Module, inner) -> Dict[str, Any]:
    """The DCP state of ``model`` (and of the wrapped optimizer ``inner``, if any): fully-qualified names,
    DTensor shards as they are."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if inner is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, inner)
    return {"model": msd, "optim": osd}


def _split_optimizer(optimizer):
    """``(inner optimizer, ReLoRA* settings and counters)``; ``(optimizer, None)`` for a plain optimizer."""
    if optimizer is None:
        return None, None
    settings = getattr(optimizer, "settings", None)
    if settings is None:
        return optimizer, None
    return optimizer.optimizer, {**settings.to_dict(), **{k: getattr(optimizer, k) for k in COUNTERS}}
