"""Distributed ReLoRA*: DDP and FSDP2 support for :class:`~relora_ext.optim.ReLoRAOptimizer`.

:class:`~relora_ext.optim.ReLoRAOptimizer` uses this module by itself; nothing here needs to be called
in an ordinary training loop. What it provides:

**Consistency check** (:func:`check_consistency`, run by the optimizer at the first cycle it executes when
``torch.distributed`` is initialised with more than one rank). Every rank all-gathers a small
:func:`fingerprint` (seed, cycle, optimizer settings, layer count, per-layer name/shape/rank/scale/dtype/
placement) and, after the reset, a hash of every new ``A`` (and, for replicated weights, of every merged
``W``). A rank that differs raises the same :class:`RuntimeError` on every rank, naming the rank, the
field and both values, before any silent divergence: a different ``seed`` (each rank would draw a
different ``A``), a different adapter layout (``target_modules``, ``r``, ``alpha``, ``init_std``), a
different ``reset_every``... are caught at the first cycle.

**DDP** needs nothing else. The rule users must follow: *the same ``seed`` on every rank*; wrap the model
with :func:`relora_ext.wrap` **before** :class:`~torch.nn.parallel.DistributedDataParallel`, and build the
optimizer from the DDP module's (or the model's: the same objects) parameters. DDP averages the gradients,
so every rank takes the same optimizer step; the merge is a deterministic per-element fp32 sum, and the reset
draws ``A`` from the counter-based Philox stream keyed by ``(seed, layer, cycle)``: all ranks then hold
bit-identical ``W``, ``A``, ``B`` and optimizer state without broadcasting anything.

**FSDP2** (:func:`torch.distributed.fsdp.fully_shard`): parameters and their optimizer state are
:class:`~torch.distributed.tensor.DTensor` s sharded on dim 0. Apply ``fully_shard`` after
:func:`relora_ext.wrap` and build the optimizer afterwards (from the sharded parameters). Per layer:

- :func:`merge_and_reset_sharded_`: ``W`` ``(out, in)`` and ``B`` ``(out, r)`` are both sharded on ``out``
  with the same chunking, so each rank merges its own rows ``W_loc += s · B_loc · A`` with the gathered
  (small, ``r × in``) ``A``; the full weight is never gathered. The reset draws the full ``A`` from Philox
  (``r × in``, small) and keeps this rank's rows, so the result is the single-process draw.
- :func:`prune_sharded_`: prunes a sharded state tensor with the *global* rule: exactly
  ``n − ⌊p·n⌋`` entries kept over all shards, largest ``|x|``, ties to the lower global flat index, NaN as
  the largest magnitude — the same entries as :func:`relora_ext.ops.prune_` on the full tensor. See
  :func:`distributed_magnitude_prune_` for the selection.

Sharded checkpoints (:func:`relora_ext.checkpoint.save_sharded` / ``load_sharded``) are in
:mod:`relora_ext.checkpoint`.

Example (``torchrun --nproc_per_node=2 train.py``)::

    dist.init_process_group("gloo")           # "nccl" on GPUs
    model = relora_ext.wrap(TinyLlama(cfg), r=32)
    model = DDP(model)                        # or: for b in model.layers: fully_shard(b); fully_shard(model)
    opt = relora_ext.ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model,
                                     reset_every=100, seed=0)      # same seed on every rank
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import _C, ops
from ._checks import is_dtensor
from .sst import SSTLinear

__all__ = [
    "is_distributed", "is_dtensor", "fingerprint", "check_consistency", "draw_hashes",
    "merge_and_reset_sharded_", "prune_sharded_", "distributed_magnitude_prune_",
    "ConsistencyError",
]

#: Elements processed per chunk by the distributed selection (bounds its temporaries).
CHUNK = 1 << 20
#: Bits per radix pass of the distributed selection (2048-bin histograms).
RADIX_BITS = 11


class ConsistencyError(RuntimeError):
    """Raised (on every rank) when ranks disagree on the ReLoRA* setup; see :func:`check_consistency`."""


# ------------------------------------------------------------------------------------------------
# small helpers


def is_distributed(group=None) -> bool:
    """``True`` when :mod:`torch.distributed` is initialised and ``group`` (default: WORLD) has > 1 rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _shard_layout(t, what: str) -> Tuple[Optional[int], Any]:
    """For a DTensor whose placements are all ``Replicate()`` except at most one ``Shard(0)``: the mesh dim
    sharding it (``None`` if replicated) and that dim's process group. Anything else raises
    :class:`NotImplementedError` naming the placements."""
    from torch.distributed.tensor import Replicate, Shard

    shard_dims = []
    for d, p in enumerate(t.placements):
        if isinstance(p, Shard) and p.dim == 0:
            shard_dims.append(d)
        elif not isinstance(p, Replicate):
            raise NotImplementedError(
                f"relora_ext.distributed: {what} has placements {tuple(t.placements)}; supported are Replicate() "
                "and one Shard(0) (FSDP2's layout, also HSDP's (Replicate(), Shard(0)))")
    if len(shard_dims) > 1:
        raise NotImplementedError(
            f"relora_ext.distributed: {what} is sharded on dim 0 over {len(shard_dims)} mesh dims "
            f"({tuple(t.placements)}); supported is at most one Shard(0)")
    if not shard_dims:
        return None, None
    d = shard_dims[0]
    return d, t.device_mesh.get_group(d)


def _local_rows(t, what: str) -> Tuple[int, int]:
    """Global row range ``[start, stop)`` of ``t``'s local shard along dim 0 (torch.chunk semantics)."""
    d, _ = _shard_layout(t, what)
    n = t.shape[0]
    if d is None:
        return 0, n
    size = t.device_mesh.size(d)
    coord = t.device_mesh.get_coordinate()[d]
    chunk = -(-n // size) if n else 0
    start = min(coord * chunk, n)
    stop = min(start + chunk, n)
    local = t.to_local()
    if local.shape[0] != stop - start:
        raise NotImplementedError(
            f"relora_ext.distributed: {what}'s local shard has {local.shape[0]} rows, expected {stop - start} "
            f"(rows [{start}, {stop}) of {n} under torch.chunk sharding over {size} ranks); uneven custom "
            "sharding is not supported")
    return start, stop


def _tensor_hash(t: torch.Tensor) -> str:
    """A device-agnostic checksum of ``t``'s bits (two int64 sums over the bit pattern), as a hex string."""
    t = t.detach().contiguous().reshape(-1)
    bits = t.view(torch.int32 if t.element_size() == 4 else torch.int16 if t.element_size() == 2 else torch.uint8)
    s1 = s2 = 0
    for a in range(0, bits.numel(), CHUNK):
        b = bits[a:a + CHUNK].to(torch.int64) & 0xFFFFFFFF
        w = torch.arange(a, a + b.numel(), device=b.device, dtype=torch.int64) % 65521 + 1
        s1 += int(b.sum())
        s2 += int((b * w).sum())
    return f"{s1 & (2**64 - 1):016x}{s2 & (2**64 - 1):016x}"


# ------------------------------------------------------------------------------------------------
# consistency check


def fingerprint(opt) -> Dict[str, Any]:
    """What every rank must agree on at a cycle, as a plain dict (see :func:`check_consistency`).

    Keys: ``seed``, ``cycle``, ``steps_taken``, ``reset_every``, ``prune``, ``prune_ratio``, ``rounding``,
    ``prune_guard``, ``world_size``, ``layers`` (count) and ``layer[i]`` = ``(name, W shape, r, alpha,
    init_std, dtype, placements)`` with global shapes (an FSDP2 shard reports the full shape), and for CPU
    layers the instruction-set level of the kernels (the default level merges without FMA: 1-2 ulp apart).
    Example: ``fingerprint(opt)["seed"]``.
    """
    import torch.distributed as dist

    fp: Dict[str, Any] = {
        **opt.settings.to_dict(), "cycle": opt.cycles_done, "steps_taken": opt.steps_taken,
        "world_size": dist.get_world_size(getattr(opt, "process_group", None)),
        "layers": len(opt.model_layers),
    }
    for i, (name, layer) in enumerate(opt.model_layers):
        w = layer.sigma if isinstance(layer, SSTLinear) else layer.weight
        if w.device.type == "cpu":  # the CPU merge rounds differently without FMA (the default level)
            fp["cpu kernels level"] = _C._cpu_capability()
        placements = tuple(str(p) for p in w.placements) if is_dtensor(w) else ()
        fp[f"layer[{i}]"] = (_canonical_name(name), type(layer).__name__, tuple(w.shape), int(layer.r),
                             getattr(layer, "alpha", None), getattr(layer, "init_std", None), str(w.dtype), placements)
    return fp


def _canonical_name(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def draw_hashes(opt, full_A: Optional[Sequence[torch.Tensor]] = None) -> Dict[str, Any]:
    """Checksums of every layer's ``A`` (the fresh draw) and, for replicated (non-DTensor) weights, of ``W``.

    ``full_A`` (optional) gives the full ``A`` of each layer (the sharded path draws it anyway); otherwise
    replicated ``A`` are read from the layers and sharded ones are skipped. Example: ``draw_hashes(opt)``.
    """
    out: Dict[str, Any] = {}
    for i, (_, layer) in enumerate(opt.model_layers):
        if isinstance(layer, SSTLinear):  # SST: the sampled directions and the spectrum
            out[f"U_active[{i}] after resample"] = _tensor_hash(layer.U_active)
            out[f"sigma[{i}]"] = _tensor_hash(layer.sigma)
            continue
        a = full_A[i] if full_A is not None and full_A[i] is not None else layer.lora_A
        if not is_dtensor(a):
            out[f"A[{i}] after reset"] = _tensor_hash(a)
        if not is_dtensor(layer.weight):
            out[f"W[{i}] after merge"] = _tensor_hash(layer.weight)
    return out


def check_consistency(info: Dict[str, Any], *, group=None, what: str = "setup", hint: str = "") -> None:
    """All-gather ``info`` (a dict of picklable values) over ``group`` and raise if any rank's differs.

    Collective: every rank of ``group`` must call it. On a mismatch every rank raises the same
    :class:`ConsistencyError` naming the first differing rank, field and both values, e.g.
    ``rank 1 has seed=1 but rank 0 has seed=0``. Example:
    ``check_consistency(fingerprint(opt), what="ReLoRA* setup at cycle 0")``.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, info, group=group)
    ref = gathered[0]
    for rank in range(1, world):
        other = gathered[rank]
        for key in list(ref) + [k for k in other if k not in ref]:
            a, b = ref.get(key, "<missing>"), other.get(key, "<missing>")
            if a != b:
                g_rank = dist.get_global_rank(group, rank) if group is not None else rank
                g_ref = dist.get_global_rank(group, 0) if group is not None else 0
                raise ConsistencyError(
                    f"ReLoRAOptimizer: distributed {what} differs between ranks: rank {g_rank} has {key}={b!r} "
                    f"but rank {g_ref} has {key}={a!r}.{(' ' + hint) if hint else ''}")


# ------------------------------------------------------------------------------------------------
# FSDP2: merge and reset on shards


@torch.no_grad()
def merge_and_reset_sharded_(layer, *, seed: int, offset: int, rounding: str = "nearest",
                             merge_seed: Optional[int] = None) -> torch.Tensor:
    """One ReLoRA* restart of a :class:`~relora_ext.lora.LoRALinear` whose parameters are DTensors.

    ``W`` ``(out, in)`` and ``B`` ``(out, r)`` must be sharded alike (``Shard(0)`` or replicated): each rank
    merges its rows, ``W_loc += s · B_loc · A`` with ``A`` ``(r, in)`` gathered (``full_tensor()``, ``r·in``
    elements). Then ``B_loc ← 0`` and ``A_loc ←`` this rank's rows of the full Philox draw
    ``init_std · N(0,1)`` at ``(seed, offset)``, i.e. exactly the single-process draw. With
    ``rounding="nearest"`` the merged ``W`` equals the unsharded merge bit for bit; ``"stochastic"`` is
    unbiased and consistent across ranks but its random bits depend on the local row index, so it is not
    bit-equal to an unsharded run. Returns the full new ``A`` (for :func:`draw_hashes`).

    Raises :class:`ValueError` if ``A`` or ``B`` holds NaN/Inf (checked by the caller on all ranks first).
    Example: ``merge_and_reset_sharded_(model.layers[0].mlp.up_proj, seed=0, offset=reset_offset(0, c))``.
    """

    W, A, B = layer.weight, layer.lora_A, layer.lora_B
    if not (is_dtensor(W) and is_dtensor(B)):
        raise TypeError("merge_and_reset_sharded_: weight and lora_B must both be DTensors (FSDP2 parameters), "
                        f"got weight {type(W).__name__}, lora_B {type(B).__name__}")
    if tuple(W.placements) != tuple(B.placements) or W.device_mesh != B.device_mesh:
        raise NotImplementedError(
            f"merge_and_reset_sharded_: weight and lora_B must share mesh and placements, got {tuple(W.placements)} "
            f"and {tuple(B.placements)}")
    w_rows = _local_rows(W, "weight")
    b_rows = _local_rows(B, "lora_B")
    if w_rows != b_rows:
        raise NotImplementedError(f"merge_and_reset_sharded_: weight rows {w_rows} and lora_B rows {b_rows} differ")
    A_full = A.full_tensor() if is_dtensor(A) else A
    W_loc, B_loc = W.to_local(), B.to_local()
    if W_loc.numel():
        if merge_seed is None:
            if rounding == "stochastic":
                raise ValueError("merge_and_reset_sharded_: rounding='stochastic' needs merge_seed (the same on every "
                                 "rank), got None")
            merge_seed = 0  # unused by nearest rounding
        ops.merge_(W_loc, A_full.contiguous(), B_loc.contiguous(), layer.scaling, rounding=rounding, seed=merge_seed)
    # reset: draw the whole A (small) from the Philox stream, keep this rank's rows
    new_A = torch.empty(tuple(A.shape), dtype=A.dtype, device=W_loc.device)
    empty_B = torch.empty(0, dtype=A.dtype, device=W_loc.device)
    ops.reset_(new_A, empty_B, std=layer.init_std, seed=seed, offset=offset)
    B_loc.zero_()
    if is_dtensor(A):
        a0, a1 = _local_rows(A, "lora_A")
        A.to_local().copy_(new_A[a0:a1])
    else:
        A.copy_(new_A)
    return new_A


# ------------------------------------------------------------------------------------------------
# distributed exact magnitude selection


def _keys(chunk: torch.Tensor) -> torch.Tensor:
    """|x| bit keys as int32 (sign bit cleared): monotone in |x|, -0 == +0, every NaN above +Inf."""
    if chunk.dtype == torch.float32:
        return chunk.view(torch.int32) & 0x7FFFFFFF
    return (chunk.view(torch.int16) & 0x7FFF).to(torch.int32)


@torch.no_grad()
def distributed_magnitude_prune_(x: torch.Tensor, ratio: float, *, group=None) -> int:
    """Exact global magnitude pruning of a tensor split over the ranks of ``group``, in place.

    ``x`` is this rank's contiguous local piece (float32, bfloat16 or float16); the global tensor is the
    concatenation of the pieces in ``group`` rank order (true for a DTensor ``Shard(0)``: mesh coordinate
    ``i`` holds chunk ``i``). Keeps exactly ``k = n − ⌊ratio·n⌋`` entries over all ``n`` global entries:
    largest ``|x|``, ties to the lower global flat index, NaN the largest magnitude — the entries
    :func:`relora_ext.ops.prune_` keeps on the full tensor. Returns ``k`` (the global count kept).

    Algorithm (collective; pure PyTorch ops, so it runs on any device/backend with ``all_reduce``):

    1. the key of an entry is the bit pattern of ``|x|`` read as an integer (31 bits for fp32, 15 for
       bf16/fp16) — monotone in ``|x|``, every NaN above +Inf;
    2. radix selection from the top bits down, :data:`RADIX_BITS` bits a pass: each rank histograms the
       next digit of the keys that share the prefix found so far (``torch.bincount``), the histograms are
       summed with ``all_reduce``, and walking the summed bins from the top gives the digit of the
       ``k``-th largest key. After 3 passes (fp32; 2 for 16-bit) that is the threshold key ``T``, with
       ``c_gt = #{key > T}`` globally;
    3. ties: ``take = k − c_gt`` entries with key ``T`` are kept. Each rank counts its keys ``== T``; an
       ``all_gather`` of those counts gives the exclusive prefix over lower ranks, so this rank keeps its
       first ``clamp(take − prefix, 0, count)`` of them (lower global flat index first);
    4. write pass: zero keys ``< T`` and the keys ``== T`` beyond this rank's budget.

    Communication: one ``all_reduce`` of ``2**RADIX_BITS`` int64 per pass plus one ``all_gather`` of one
    int64 per rank. Memory: temporaries of :data:`CHUNK` elements (no copy of ``x``).

    Example (2 ranks, each holding half of ``[0.1, -3, 2, 0]``)::

        >>> x = torch.tensor([0.1, -3.0]) if rank == 0 else torch.tensor([2.0, 0.0])
        >>> distributed_magnitude_prune_(x, 0.5)     # rank 0: [0., -3.]; rank 1: [2., 0.]
        2
    """
    import torch.distributed as dist

    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"distributed_magnitude_prune_: x must be float32, bfloat16 or float16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"distributed_magnitude_prune_: x must be contiguous, got strides {x.stride()}")
    flat = x.view(-1)
    dev = x.device
    n_t = torch.tensor([flat.numel()], dtype=torch.int64, device=dev)
    dist.all_reduce(n_t, group=group)
    n = int(n_t)
    k = ops.keep_count(n, float(ratio))
    if k >= n:
        return n
    if k == 0:
        flat.zero_()
        return 0

    key_bits = 31 if x.dtype == torch.float32 else 15
    prefix, shift, c_gt, remaining = 0, key_bits, 0, k
    c_eq = 0
    while shift > 0:
        width = min(RADIX_BITS, shift)
        shift -= width
        bins = 1 << width
        hist = torch.zeros(bins, dtype=torch.int64, device=dev)
        for a in range(0, flat.numel(), CHUNK):
            key = _keys(flat[a:a + CHUNK])
            hi = key >> (shift + width)
            digit = (key >> shift) & (bins - 1)
            digit = digit[hi == prefix] if shift + width < key_bits else digit
            hist += torch.bincount(digit.to(torch.int64), minlength=bins)
        dist.all_reduce(hist, group=group)
        # walk from the top bin: the bin holding the `remaining`-th largest key
        above = torch.flip(hist, [0]).cumsum(0)          # above[j] = count in bins >= bins-1-j
        j = int(torch.searchsorted(above, torch.tensor([remaining], device=dev, dtype=torch.int64)))
        digit_sel = bins - 1 - j
        higher = int(above[j - 1]) if j > 0 else 0
        c_gt += higher
        remaining -= higher
        c_eq = int(hist[digit_sel])
        prefix = (prefix << width) | digit_sel
    T = prefix
    take = k - c_gt                                      # 1 <= take <= c_eq
    if take == c_eq:
        budget = -1                                      # keep every key == T
    else:
        local_eq = torch.zeros(1, dtype=torch.int64, device=dev)
        for a in range(0, flat.numel(), CHUNK):
            local_eq += (_keys(flat[a:a + CHUNK]) == T).sum()
        world = dist.get_world_size(group)
        counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
        dist.all_gather(counts, local_eq, group=group)
        me = dist.get_rank(group)
        before = sum(int(c) for c in counts[:me])
        budget = max(0, min(take - before, int(local_eq)))
    for a in range(0, flat.numel(), CHUNK):
        piece = flat[a:a + CHUNK]
        key = _keys(piece)
        drop = key < T
        if budget >= 0:
            eq = key == T
            rank_eq = eq.cumsum(0)
            drop |= eq & (rank_eq > budget)
            budget = max(0, budget - int(eq.sum()))
        piece.masked_fill_(drop, 0)
    return k


@torch.no_grad()
def prune_sharded_(x, ratio: float, *, mode: str = "magnitude", seed: Optional[int] = None,
                   offset: int = 0) -> int:
    """Prune a DTensor optimizer-state tensor (e.g. FSDP2's ``exp_avg``) with the single-process rule.

    Placements: ``Shard(0)`` on one mesh dim, ``Replicate()`` on the others (FSDP2, HSDP). Modes as
    :func:`relora_ext.ops.prune_`: ``"magnitude"`` runs :func:`distributed_magnitude_prune_` over the shard
    group (same kept entries as pruning the full tensor in one process); ``"random"`` draws the full Philox
    mask at ``(seed, offset)`` (one byte-sized temporary of the full state's size — adapter state is
    small) and applies this rank's rows, so it too equals the single-process result; ``"reset"`` zeroes.
    Returns the global number of entries kept. Example: ``prune_sharded_(opt.state[p]["exp_avg"], 0.99)``.
    """

    local = x.to_local() if is_dtensor(x) else x
    if mode == "reset":
        local.zero_()
        return 0
    d, group = _shard_layout(x, "the optimizer state") if is_dtensor(x) else (None, None)
    if d is None:
        return ops.prune_(local, ratio, mode=mode, seed=seed, offset=offset)
    if mode == "magnitude":
        return distributed_magnitude_prune_(local, ratio, group=group)
    if mode != "random":
        raise ValueError(f"prune_sharded_: mode must be 'magnitude', 'random' or 'reset', got {mode!r}")
    mask = torch.ones(tuple(x.shape), dtype=torch.float32, device=local.device)
    kept = ops.prune_(mask, ratio, mode="random", seed=seed, offset=offset)
    r0, r1 = _local_rows(x, "the optimizer state")
    local.masked_fill_(mask[r0:r1] == 0, 0)   # not mul_: NaN * 0 is NaN, and -x * 0 is -0.0
    return kept
