"""Distributed ReLoRA*: DDP and FSDP2 with 2 gloo processes on CPU (127.0.0.1 only).

Each test spawns 2 worker processes (``torch.multiprocessing``, 1 thread each) that write their results to
``tmp_path``; the assertions comparing with a single-process run happen in the pytest process.
"""

import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from relora_ext import ReLoRAOptimizer, ops, wrap
from relora_ext.tiny_llama import TinyLlama, TinyLlamaConfig
from _workers import init_gloo, start_workers

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available")

WORLD = 2
RESET_EVERY = 3
STEPS = 10            # 3 cycles (after steps 3, 6, 9) and one step into the 4th
GLOBAL_BATCH = 8
SEQ = 16
VOCAB = 64


# ------------------------------------------------------------------------------------------------
# launching


def _entry(rank, port, fn, args):
    init_gloo(rank, port, WORLD, timeout_s=60)
    try:
        fn(rank, *args)
        dist.barrier()  # both ranks done with every collective before the group is torn down
    finally:
        dist.destroy_process_group()
    # Results are on disk: leave without interpreter finalization, where torch 2.13's gloo/FSDP2 teardown
    # sometimes aborts ("terminate called without an active exception", no Python frame left), ~1 run in 20.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, *args, timeout=150):
    """Run ``fn(rank, *args)`` on 2 gloo ranks; a worker's exception fails the test with its traceback."""
    ctx = start_workers(_entry, fn, args, world=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish within {timeout} s")


# ------------------------------------------------------------------------------------------------
# the model, data and single-process reference


def build_model(seed=0, **wrap_kw):
    torch.manual_seed(seed)
    model = TinyLlama(TinyLlamaConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, max_seq_len=SEQ))
    return wrap(model, r=wrap_kw.pop("r", 4), **wrap_kw)


def global_batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(n)]


def lm_loss(model, ids):
    return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def make_opt(model, params=None, **kw):
    inner = torch.optim.AdamW(list(params if params is not None else model.parameters()), lr=1e-2,
                              weight_decay=0.0)
    kw.setdefault("reset_every", RESET_EVERY)
    kw.setdefault("prune_ratio", 0.9)
    return ReLoRAOptimizer(inner, model, **kw)


def single_process_run(steps=STEPS):
    torch.set_num_threads(1)
    model = build_model()
    opt = make_opt(model)
    losses = []
    for ids in global_batches(steps):
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, opt


def _local_batch(ids, rank):
    per = GLOBAL_BATCH // WORLD
    return ids[rank * per:(rank + 1) * per]


def _global_loss(loss):
    t = loss.detach().clone()
    dist.all_reduce(t)
    return (t / WORLD).item()


def _bits(t):
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16).clone()


# ------------------------------------------------------------------------------------------------
# DDP


def _ddp_worker(rank, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build_model()
    ddp = DDP(model)
    opt = make_opt(ddp, ddp.parameters())
    losses, identical = [], []
    for ids in global_batches(STEPS):
        loss = lm_loss(ddp, _local_batch(ids, rank))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(_global_loss(loss))
        if opt.steps_taken % RESET_EVERY == 0:  # a cycle just ran: every rank must hold the same bits
            mine = [_bits(p) for p in model.parameters()]
            mine += [_bits(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
            gathered = [None] * WORLD
            dist.all_gather_object(gathered, mine)
            identical.append(all(torch.equal(a, b) for a, b in zip(gathered[0], gathered[1]))
                             and len(gathered[0]) == len(gathered[1]))
    if rank == 0:
        torch.save({"losses": losses, "identical": identical, "cycles": opt.cycles_done,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}},
                   os.path.join(out_dir, "ddp.pt"))


def test_ddp_matches_single_process_and_ranks_stay_identical(tmp_path):
    spawn(_ddp_worker, str(tmp_path))
    res = torch.load(tmp_path / "ddp.pt")
    ref_losses, ref_state, ref_opt = single_process_run()
    assert res["cycles"] == ref_opt.cycles_done == 3
    assert res["identical"] == [True, True, True]          # bit-identical W, A, B and state after each cycle
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    for k, v in ref_state.items():
        torch.testing.assert_close(res["state"][k], v, rtol=1e-3, atol=1e-3, msg=lambda m: f"{k}: {m}")


# ------------------------------------------------------------------------------------------------
# a rank that differs is caught at the first cycle


def _expect_consistency_error(opt, model, rank, ids_list):
    from relora_ext.distributed import ConsistencyError

    for i, ids in enumerate(ids_list):
        loss = lm_loss(model, _local_batch(ids, rank))
        loss.backward()
        if i + 1 < RESET_EVERY:
            opt.step()
            opt.zero_grad()
            continue
        try:
            opt.step()  # the first cycle
        except ConsistencyError as e:
            assert opt.cycles_done == 0
            return str(e)
        raise AssertionError(f"rank {rank}: no ConsistencyError at the first cycle")


def _mismatch_worker(rank, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    msgs = {}
    batches = global_batches(RESET_EVERY)
    # 1. a different seed on rank 1 (DDP itself cannot notice: the parameters agree until the first reset)
    model = build_model()
    ddp = DDP(model)
    msgs["seed"] = _expect_consistency_error(make_opt(ddp, seed=rank), ddp, rank, batches)
    # 2. same parameter shapes, different adapter scale (alpha) on rank 1: DDP cannot notice either
    model = build_model(alpha=4.0 if rank == 0 else 8.0)
    ddp = DDP(model)
    msgs["alpha"] = _expect_consistency_error(make_opt(ddp), ddp, rank, batches)
    # 3. a different adapter layout (rank 1 leaves down_proj alone), gradients averaged by hand
    model = build_model(exclude_modules=["down_proj"] if rank == 1 else None)
    opt = make_opt(model)
    msgs["layout"] = _expect_consistency_error(opt, model, rank, batches)
    # 4. rank 1's kernels at the default level (no FMA: its merges round 1-2 ulp apart from rank 0's)
    from relora_ext import _C_testing

    levels = _C_testing.cpu_capabilities()
    if len(levels) > 1:
        if rank == 1:
            _C_testing.set_cpu_capability("default")
        model = build_model()
        ddp = DDP(model)
        msgs["level"] = _expect_consistency_error(make_opt(ddp), ddp, rank, batches)
        _C_testing.set_cpu_capability(levels[-1])
    torch.save(msgs, os.path.join(out_dir, f"mismatch{rank}.pt"))


def test_rank_with_different_seed_or_layout_is_caught(tmp_path):
    spawn(_mismatch_worker, str(tmp_path))
    for rank in range(WORLD):
        msgs = torch.load(tmp_path / f"mismatch{rank}.pt")
        assert "rank 1 has seed=1 but rank 0 has seed=0" in msgs["seed"]
        assert "rank 1 has layer[0]=" in msgs["alpha"] and "8.0" in msgs["alpha"]
        assert "rank 1 has layers=12 but rank 0 has layers=14" in msgs["layout"]
        if "level" in msgs:
            assert "rank 1 has cpu kernels level='default'" in msgs["level"]
        assert all("same seed" in m for m in msgs.values())


# ------------------------------------------------------------------------------------------------
# FSDP2


def _fsdp_model(**kw):
    from torch.distributed.fsdp import fully_shard

    model = build_model(**kw)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def _fsdp_merge_and_prune(rank, out_dir):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from relora_ext.distributed import merge_and_reset_sharded_, prune_sharded_
    from relora_ext.model import lora_layers

    from torch.distributed.fsdp import fully_shard

    report = {}

    def merges_equal(model):
        merge_ok = []
        with torch.no_grad():
            for li, (name, layer) in enumerate(lora_layers(model)):
                W, A, B = (layer.weight.full_tensor(), layer.lora_A.full_tensor(), layer.lora_B.full_tensor())
                assert bool(B.ne(0).any()), name
                ops.merge_(W, A, B, layer.scaling)
                ops.reset_(A, B, std=layer.init_std, seed=7, offset=li)
                merge_and_reset_sharded_(layer, seed=7, offset=li)
                merge_ok.append(all(torch.equal(_bits(got), _bits(want)) for got, want in
                                    ((layer.weight, W), (layer.lora_A, A), (layer.lora_B, B))))
        return merge_ok

    # merge: train 2 steps so that B != 0, then one sharded restart per layer vs the unsharded ops
    model = _fsdp_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for ids in global_batches(2):
        lm_loss(model, _local_batch(ids, rank)).backward()
        opt.step()
        opt.zero_grad()
    report["merge"] = merges_equal(model)
    # uneven shards: out = 7 and 5 rows, r = 3 rows of A over 2 ranks
    torch.manual_seed(0)
    small = wrap(torch.nn.Sequential(torch.nn.Linear(10, 7), torch.nn.ReLU(), torch.nn.Linear(7, 5)), r=3,
                 target_modules=["0", "2"])
    fully_shard(small)
    opt = torch.optim.AdamW([p for p in small.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        small(torch.randn(4, 10, generator=torch.Generator().manual_seed(rank))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert small[0].weight.to_local().shape[0] == (4 if rank == 0 else 3)
    report["merge"] += merges_equal(small)

    # prune: global selection over uneven shards, ties, NaN, three dtypes, several ratios, both modes
    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(3)
    prune_ok = []
    for shape in [(7, 5), (33, 4), (2, 64), (1, 3), (3000, 20)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            base = (torch.randn(shape, generator=g) * 4).round() / 4      # many exact ties
            base.view(-1)[::17] = float("nan")
            base.view(-1)[1::13] = -0.0
            base = base.to(dtype)
            for ratio in (0.0, 0.3, 0.5, 0.9, 0.99, 1.0):
                for mode in ("magnitude", "random"):
                    want = base.clone()
                    k_want = ops.prune_(want, ratio, mode=mode, seed=11, offset=5)
                    dt = distribute_tensor(base.clone(), mesh, [Shard(0)])
                    k_got = prune_sharded_(dt, ratio, mode=mode, seed=11, offset=5)
                    prune_ok.append((shape, str(dtype), ratio, mode, k_got == k_want,
                                     torch.equal(_bits(dt), _bits(want))))
    report["prune"] = prune_ok
    torch.save(report, os.path.join(out_dir, f"fsdp_ops{rank}.pt"))


def test_fsdp2_shard_local_merge_and_global_prune_equal_single_process(tmp_path):
    spawn(_fsdp_merge_and_prune, str(tmp_path))
    for rank in range(WORLD):
        rep = torch.load(tmp_path / f"fsdp_ops{rank}.pt")
        assert rep["merge"] and all(rep["merge"])
        bad = [r for r in rep["prune"] if not (r[4] and r[5])]
        assert not bad, bad


def _fsdp_train(model, opt, batches, rank, start=0):
    losses = []
    for ids in batches[start:]:
        loss = lm_loss(model, _local_batch(ids, rank))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(_global_loss(loss))
    return losses


def _fsdp_train_and_checkpoint(rank, out_dir):
    from relora_ext.checkpoint import load_sharded, save_sharded

    batches = global_batches(STEPS)
    # ReLoRAOptimizer on FSDP2 over 3 cycles, against the single-process run (compared in the parent)
    model = _fsdp_model()
    opt = make_opt(model)
    losses = _fsdp_train(model, opt, batches, rank)
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}
    # sharded checkpoint mid-cycle (step 4 of 10), resume in fresh objects
    ckpt = os.path.join(out_dir, "ckpt")
    model = _fsdp_model()
    opt = make_opt(model)
    _fsdp_train(model, opt, batches[:4], rank)
    save_sharded(ckpt, model=model, optimizer=opt, extra={"step": 4})
    after = _fsdp_train(model, opt, batches, rank, start=4)
    model2 = _fsdp_model(seed=123)           # different initial weights: everything must come from the checkpoint
    opt2 = make_opt(model2)
    extra = load_sharded(ckpt, model=model2, optimizer=opt2)
    resumed = _fsdp_train(model2, opt2, batches, rank, start=4)
    if rank == 0:
        torch.save({"losses": losses, "state": full, "cycles": opt.cycles_done, "after": after, "resumed": resumed,
                    "extra": extra, "resumed_cycles": opt2.cycles_done, "kept": opt.last_prune_kept,
                    "total": opt.last_prune_total}, os.path.join(out_dir, "fsdp_train.pt"))


def test_fsdp2_training_matches_single_process_and_sharded_checkpoint_resumes(tmp_path):
    spawn(_fsdp_train_and_checkpoint, str(tmp_path))
    res = torch.load(tmp_path / "fsdp_train.pt")
    ref_losses, ref_state, ref_opt = single_process_run()
    assert res["cycles"] == 3 and res["resumed_cycles"] == 3
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    for k, v in ref_state.items():
        torch.testing.assert_close(res["state"][k], v, rtol=1e-3, atol=1e-3, msg=lambda m: f"{k}: {m}")
    assert (res["kept"], res["total"]) == (ref_opt.last_prune_kept, ref_opt.last_prune_total)
    assert res["extra"] == {"step": 4}
    assert res["resumed"] == res["after"]        # bit-identical losses after the resume


# ------------------------------------------------------------------------------------------------
# a refused cycle under FSDP2: the ranks vote, and every collective runs on the parameters' device


def _fsdp_refusal_worker(rank, out_dir):
    from relora_ext import CycleRefused
    from relora_ext.model import lora_layers

    model = _fsdp_model()
    opt = make_opt(model, reset_every=100)
    _fsdp_train(model, opt, global_batches(2), rank)
    param_device = lora_layers(model)[0][1].lora_A.to_local().device
    seen = []

    def recording(fn):
        def wrapper(tensor, *args, **kwargs):
            ts = tensor if isinstance(tensor, (list, tuple)) else [tensor]
            seen.extend((fn.__name__, t.device) for t in ts if isinstance(t, torch.Tensor))
            return fn(tensor, *args, **kwargs)
        return wrapper

    real = {fn_name: getattr(dist, fn_name) for fn_name in ("all_reduce", "all_gather", "broadcast")}
    for fn_name, fn in real.items():
        setattr(dist, fn_name, recording(fn))
    try:
        # a NaN in rank 1's shard only: both ranks must refuse, and change nothing
        layer_name, layer = lora_layers(model)[1]
        if rank == 1:
            with torch.no_grad():
                layer.lora_B.to_local()[0, 0] = float("nan")
        before = {k: _bits(v).clone() for k, v in model.state_dict().items()}
        refused = ""
        try:
            opt.restart()
        except CycleRefused as e:
            refused = str(e)
        unchanged = all(torch.equal(_bits(v), before[k]) for k, v in model.state_dict().items())
        # and a cycle that runs, recording the devices of its collectives
        if rank == 1:
            with torch.no_grad():
                layer.lora_B.to_local()[0, 0] = 0.0
        opt.restart()
    finally:
        for fn_name, fn in real.items():
            setattr(dist, fn_name, fn)
    torch.save({"refused": refused, "unchanged": unchanged, "cycles": opt.cycles_done, "seen": seen,
                "param_device": param_device, "layer": layer_name}, os.path.join(out_dir, f"refusal{rank}.pt"))


def test_fsdp2_refused_cycle_is_refused_on_every_rank_and_collectives_stay_on_the_parameters_device(tmp_path):
    spawn(_fsdp_refusal_worker, str(tmp_path))
    for rank in range(WORLD):
        rep = torch.load(tmp_path / f"refusal{rank}.pt")
        assert "refused, nothing was changed" in rep["refused"] and rep["layer"] in rep["refused"]
        assert ("non-finite" in rep["refused"]) == (rank == 1)   # rank 0 refuses because rank 1 voted so
        assert rep["unchanged"] and rep["cycles"] == 1
        assert rep["seen"], "the cycle ran no recorded collective"
        wrong = [(fn, d) for fn, d in rep["seen"] if d != rep["param_device"]]
        assert not wrong, f"collectives on another device than the parameters ({rep['param_device']}): {wrong}"


# ------------------------------------------------------------------------------------------------
# SST under DDP: every rank samples the same directions without communicating them


def _sst_ddp_worker(rank, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build_model(method="sst")
    ddp = DDP(model)
    opt = make_opt(ddp, reset_every=2)
    for ids in global_batches(7):
        lm_loss(ddp, _local_batch(ids, rank)).backward()
        opt.step()
        opt.zero_grad()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state": state, "cycles": opt.cycles_done}, os.path.join(out_dir, f"sst{rank}.pt"))


def test_sst_under_ddp_ranks_stay_identical(tmp_path):
    spawn(_sst_ddp_worker, str(tmp_path))
    reps = [torch.load(tmp_path / f"sst{rank}.pt") for rank in range(WORLD)]
    assert reps[0]["cycles"] == 3
    actives = [k for k in reps[0]["state"] if k.endswith(".active")]
    assert actives and any(not torch.equal(reps[0]["state"][k], torch.arange(4)) for k in actives)  # resampled
    for k, v in reps[0]["state"].items():
        assert torch.equal(_bits(v) if v.is_floating_point() else v,
                           _bits(reps[1]["state"][k]) if v.is_floating_point() else reps[1]["state"][k]), k


def _sst_fsdp_worker(rank, out_dir):
    model = _fsdp_model(method="sst")
    try:
        make_opt(model)
        err = ""
    except ValueError as e:
        err = str(e)
    torch.save({"err": err}, os.path.join(out_dir, f"sst_fsdp{rank}.pt"))


def test_sst_under_fsdp2_is_refused_when_the_optimizer_is_built(tmp_path):
    spawn(_sst_fsdp_worker, str(tmp_path))
    for rank in range(WORLD):
        err = torch.load(tmp_path / f"sst_fsdp{rank}.pt")["err"]
        assert "SST layers under FSDP2" in err and "DDP" in err, err
