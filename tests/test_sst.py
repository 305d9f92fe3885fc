"""SST (Sparse Spectral Training): SSTLinear, the enhanced gradient, sampling, the iteration and round work in
the cycle machinery, checkpoints, all-or-nothing refusals."""

import pytest
import torch
from torch import nn

import relora_ext
from relora_ext import CycleRefused, ReLoRAOptimizer, SSTLinear, load_checkpoint, ops, save_checkpoint, unwrap, wrap
from relora_ext.sst import sample_directions, sample_offset


def layer_of(out=12, inp=20, r=3, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, dtype=dtype)
    return lin, SSTLinear.from_linear(lin, r=r)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16), (7, 5)])
def test_from_linear_computes_the_linear_layer(shape):
    out, inp = shape
    lin, sst = layer_of(out, inp, r=2)
    x = torch.randn(3, 4, inp)
    torch.testing.assert_close(sst(x), lin(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sst.weight_sst(), lin.weight.detach(), rtol=1e-5, atol=1e-6)
    assert sst.sigma.shape == (min(shape),) and sst.U_active.shape == (out, 2) and sst.V_active.shape == (inp, 2)
    assert bool((sst.U[:, sst.active] == 0).all())      # the active columns live in the Parameters only


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_function_unchanged_by_renormalize_resample_and_resvd(dtype, tol):
    _, sst = layer_of(dtype=dtype)
    with torch.no_grad():   # move away from the SVD: unnormalised, non-orthogonal active columns
        sst.U_active.mul_(1.7).add_(0.05)
        sst.V_active.mul_(0.6)
    x = torch.randn(6, 20, dtype=dtype)
    y = sst(x).float()
    for op in (sst.renormalize_, lambda: sst.resample_(seed=3, offset=sample_offset(0, 1)), sst.resvd_):
        op()
        torch.testing.assert_close(sst(x).float(), y, rtol=tol, atol=tol)
    assert bool((sst.sigma >= 0).all())


@pytest.mark.parametrize("tokens", [5, 13])  # fewer tokens than out: U diag(Σ) Vᵀ recomputed, else kept
def test_enhanced_gradient_float64(tokens):
    """U_active[:, i] gets ∂L/∂W · V_i and V_active[:, i] gets (∂L/∂W)ᵀ U_i (no Σ_i); x and Σ the true gradients."""
    _, sst = layer_of(out=9, inp=11, r=4, dtype=torch.float64)
    x = torch.randn(tokens, 11, dtype=torch.float64, requires_grad=True)
    R = torch.randn(tokens, 9, dtype=torch.float64)
    (sst(x) * R).sum().backward()
    W = sst.weight_sst()
    dW = R.t() @ x.detach()                              # ∂L/∂W for y = x Wᵀ
    U, V = sst.U.clone(), sst.V.clone()
    U[:, sst.active], V[:, sst.active] = sst.U_active.detach(), sst.V_active.detach()
    torch.testing.assert_close(sst.U_active.grad, dW @ sst.V_active.detach())
    torch.testing.assert_close(sst.V_active.grad, dW.t() @ sst.U_active.detach())
    torch.testing.assert_close(sst.sigma.grad, torch.diagonal(U.t() @ dW @ V))
    torch.testing.assert_close(x.grad, R @ W)


def test_gradcheck_and_gradgradcheck_for_x_and_sigma():
    _, sst = layer_of(out=5, inp=6, r=2, dtype=torch.float64)
    U_a, V_a = sst.U_active.detach(), sst.V_active.detach()

    def f(x, sigma):  # the layer's function of x and Σ (U, V and the active columns fixed)
        W = (sst.U * sigma) @ sst.V.t()
        return x @ W.t() + ((x @ V_a) * sigma[sst.active]) @ U_a.t()

    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    sigma = sst.sigma.detach().clone().requires_grad_()
    # the layer's forward with these inputs equals f
    with torch.no_grad():
        sst.sigma.copy_(sigma)
    torch.testing.assert_close(sst(x) - (sst.bias if sst.bias is not None else 0), f(x, sigma))
    assert torch.autograd.gradcheck(f, (x, sigma))
    assert torch.autograd.gradgradcheck(f, (x, sigma))


def test_sampling_is_without_replacement_deterministic_and_follows_p():
    sigma = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    S = sample_directions(sigma, 3, seed=1, offset=5)
    assert S.tolist() == sorted(set(S.tolist())) and len(S) == 3
    assert torch.equal(S, sample_directions(sigma, 3, seed=1, offset=5))
    counts = torch.zeros(8)
    n = 4000
    for off in range(n):
        counts[sample_directions(sigma, 1, seed=2, offset=off)] += 1
    p = 0.5 / 8 + 0.5 * sigma / sigma.sum()
    assert torch.allclose(counts / n, p, atol=0.02)      # r = 1: exactly the categorical p


def test_uniform_stream_is_the_kernels_philox_stream():
    u = torch.empty(1000)
    ops.uniform_(u, seed=9, offset=4)
    assert bool(((u > 0) & (u <= 1)).all())
    kept = torch.ones(1000)
    ops.prune_(kept, 0.5, mode="random", seed=9, offset=4)  # keeps entry e iff word e < 2³¹ iff u_e <= 1/2
    assert torch.equal(kept.bool(), u <= 0.5)


def sst_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 16))
    return wrap(model, r=3, method="sst", target_modules=["0", "2"])


def train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g)
        loss = (model(x) - x.flip(1)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_iterations_rounds_state_and_sigma():
    model = sst_model()
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=5e-2), model, reset_every=2)
    layer = model[0]
    actives = []
    for step in range(12):
        train(model, opt, 1, seed=step)
        assert bool((layer.sigma >= 0).all())
        actives.append(layer.active.tolist())
        # only Σ, the active columns (and the biases, trained as in ReLoRA*) carry optimizer state
        assert {id(p) for p in opt.state} == {id(p) for l in (model[0], model[2])
                                              for p in (l.sigma, l.U_active, l.V_active, l.bias)}
        if (step + 1) % 2 == 0:   # an iteration just ended: the new active columns start without history
            for p in (layer.U_active, layer.V_active):
                assert all(float(v.abs().max()) == 0 for k, v in opt.state[p].items() if k != "step")
    assert opt.cycles_done == 6 and len({tuple(a) for a in actives}) > 1
    # unit-length active columns after every step
    torch.testing.assert_close(torch.linalg.vector_norm(layer.U_active, dim=0), torch.ones(3))


def test_checkpoint_resume_is_bit_identical(tmp_path):
    model = sst_model()
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-2), model, reset_every=3)
    full = train(model, opt, 10)
    model = sst_model()
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-2), model, reset_every=3)
    first = train(model, opt, 5)
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt)
    model2 = sst_model(seed=7)
    opt2 = ReLoRAOptimizer(torch.optim.AdamW(model2.parameters(), lr=2e-2), model2, reset_every=3)
    load_checkpoint(tmp_path / "c.pt", model=model2, optimizer=opt2)
    g_rest = train(model2, opt2, 5, seed=1)
    # the data stream restarts at seed 1: compare against an uninterrupted run of the same batches
    model = sst_model()
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-2), model, reset_every=3)
    train(model, opt, 5)
    assert train(model, opt, 5, seed=1) == g_rest
    assert first == full[:5]


def test_refused_iteration_changes_nothing():
    model = sst_model()
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-2), model, reset_every=100)
    train(model, opt, 2)
    with torch.no_grad():
        model[2].V_active[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CycleRefused, match="layer '2'.*V_active holds non-finite"):
        opt.restart()
    for k, v in model.state_dict().items():
        assert torch.equal(v.nan_to_num(), before[k].nan_to_num()), k
    assert opt.cycles_done == 0


def test_unwrap_gives_linear_layers_computing_the_same():
    model = sst_model()
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-2), model, reset_every=2)
    train(model, opt, 5)
    x = torch.randn(4, 16)
    y = model(x)
    unwrap(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_wrap_sst_refuses_lora_settings():
    with pytest.raises(ValueError, match="method='sst'.*do not apply"):
        wrap(nn.Sequential(nn.Linear(4, 4)), r=2, method="sst", lora_alpha=4)
    with pytest.raises(ValueError, match="method must be"):
        relora_ext.ReLoRAConfig(method="galore")


def test_native_op_opcheck_gradcheck_and_gradgradcheck():
    _, sst = layer_of(out=5, inp=6, r=2, dtype=torch.float64)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    sigma = sst.sigma.detach().clone().requires_grad_()
    # opcheck's gradient checks compare with numerical derivatives: run them where the op's gradient is the
    # true one (x, Σ, bias); U_active and V_active take SST's enhanced gradient by design (tested above)
    torch.library.opcheck(torch.ops.relora.sst_linear.default,
                          (x, sst.U, sst.V, sigma, sst.active, sst.U_active.detach(), sst.V_active.detach(), sst.bias))

    def f(x, sigma):   # the true gradient flows to x and Σ (the active columns held fixed)
        return torch.ops.relora.sst_linear(x, sst.U, sst.V, sigma, sst.active, sst.U_active.detach(),
                                           sst.V_active.detach(), None)

    assert torch.autograd.gradcheck(f, (x, sigma))
    assert torch.autograd.gradgradcheck(f, (x, sigma))


def test_native_op_under_bf16_autocast_and_compile():
    lin, sst = layer_of(out=16, inp=24, r=4)
    x = torch.randn(3, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sst(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), lin(x), rtol=3e-2, atol=3e-2)
    compiled = torch.compile(sst, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), sst(x))
    compiled(x).square().sum().backward()
    assert sst.U_active.grad is not None and sst.sigma.grad is not None


def test_a_step_leaves_the_frozen_columns_alone():
    model = sst_model()
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=5e-2), model, reset_every=100)
    layer = model[0]
    U, V = layer.U.clone(), layer.V.clone()
    train(model, opt, 3)
    assert torch.equal(layer.U, U) and torch.equal(layer.V, V)        # buffers: no gradient, no state
    assert all(p is not layer.U and p is not layer.V for p in opt.state)


def test_sampling_frequencies_chi_square():
    """r = 1 draws one direction with probability p(i): a chi-square test over 6000 fixed-seed draws."""
    sigma = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.0])
    n = 6000
    counts = torch.zeros(6)
    for off in range(n):
        counts[sample_directions(sigma, 1, seed=11, offset=off)] += 1
    p = 0.5 / 6 + 0.5 * sigma / sigma.sum()
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 20.5       # the 0.999 quantile of chi-square with 5 degrees of freedom


def test_samples_do_not_depend_on_the_thread_count():
    sigma = torch.rand(300, generator=torch.Generator().manual_seed(0))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sample_directions(sigma, 40, seed=5, offset=9)
        torch.set_num_threads(2)
        two = sample_directions(sigma, 40, seed=5, offset=9)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_bad_input_is_refused_with_nothing_changed():
    lin = nn.Linear(6, 4)
    for r in (0, 5, -1):
        with pytest.raises(ValueError, match="r must satisfy"):
            SSTLinear.from_linear(lin, r=r)
    model = sst_model()
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-2), model, reset_every=100)
    train(model, opt, 1)
    with torch.no_grad():
        model[0].sigma[5] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CycleRefused, match="layer '0'.*sigma holds non-finite"):
        opt.restart()
    for k, v in model.state_dict().items():
        assert torch.equal(v.nan_to_num(), before[k].nan_to_num()), k


def test_weight_dtype_keeps_the_frozen_directions_in_bf16():
    torch.manual_seed(0)
    lin = nn.Linear(20, 12)
    sst = SSTLinear.from_linear(lin, r=3, weight_dtype=torch.bfloat16)
    assert sst.U.dtype == sst.V.dtype == torch.bfloat16
    assert sst.sigma.dtype == sst.U_active.dtype == sst.V_active.dtype == torch.float32
    assert "weight_dtype=torch.bfloat16" in repr(sst)
    x = torch.randn(5, 20, dtype=torch.float64)
    ref = x @ lin.weight.detach().double().t() + lin.bias.detach().double()
    y = sst(x.float())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)   # bf16 frozen directions
    # the trained columns (the top r directions, kept in fp32) are exact: they alone carry no bf16 error
    full = SSTLinear.from_linear(lin, r=3)
    torch.testing.assert_close(sst.U_active, full.U_active)
    # gradients: the enhanced ones for the active columns, the true one for Σ, as with fp32 U and V
    y.sum().backward()
    (full(x.float())).sum().backward()
    for name in ("sigma", "U_active", "V_active"):
        torch.testing.assert_close(getattr(sst, name).grad, getattr(full, name).grad, rtol=2e-2, atol=2e-2)
    # an iteration and a round keep the dtypes and the function (up to bf16 rounding of the frozen columns)
    y0 = sst(x.float()).detach()
    sst.resample_(seed=1, offset=sample_offset(0, 1))
    sst.resvd_()
    assert sst.U.dtype == torch.bfloat16 and sst.U_active.dtype == torch.float32
    torch.testing.assert_close(sst(x.float()), y0, rtol=3e-2, atol=3e-2)
    with pytest.raises(TypeError, match="weight_dtype must be None or one of"):
        SSTLinear.from_linear(lin, r=3, weight_dtype=torch.int8)


def test_wrap_sst_with_weight_dtype_trains_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16))
    wrap(model, r=4, method="sst", weight_dtype=torch.bfloat16)
    assert all(m.U.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, SSTLinear))
    opt = ReLoRAOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
                          model, reset_every=3, seed=0)
    train(model, opt, 7)
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt)
    fp32 = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16))
    wrap(fp32, r=4, method="sst")
    opt32 = ReLoRAOptimizer(torch.optim.AdamW([p for p in fp32.parameters() if p.requires_grad], lr=1e-2),
                            fp32, reset_every=3, seed=0)
    with pytest.raises(ValueError, match="weight_dtype"):
        load_checkpoint(tmp_path / "c.pt", model=fp32, optimizer=opt32)


def test_renormalize_every_layer_in_one_call():
    from relora_ext.sst import renormalize_

    layers = [layer_of(out, inp, r=2, seed=i)[1] for i, (out, inp) in enumerate([(12, 20), (7, 5), (9, 9)])]
    x = [torch.randn(4, m.in_features, dtype=torch.float64) for m in layers]
    with torch.no_grad():
        for m in layers:
            m.U_active.mul_(1.3).add_(0.02)
            m.V_active.mul_(0.7)
            m.U_active[:, 1] = 0  # a zero column is left as it is, its Σ too
    for m in layers:
        m.double()
    before = [m(xi) for m, xi in zip(layers, x)]
    sig = [m.sigma.detach().clone() for m in layers]
    versions = [m.U_active._version for m in layers]
    renormalize_(layers)
    for m, xi, y, s, v in zip(layers, x, before, sig, versions):
        torch.testing.assert_close(torch.linalg.vector_norm(m.U_active[:, 0]).item(), 1.0)
        torch.testing.assert_close(torch.linalg.vector_norm(m.V_active[:, 0]).item(), 1.0)
        assert bool((m.U_active[:, 1] == 0).all()) and m.sigma[m.active[1]] == s[m.active[1]]
        torch.testing.assert_close(m(xi), y)            # the function is unchanged
        assert m.U_active._version > v                   # in place: a stale graph would notice
    with pytest.raises(ValueError, match="lists of one length"):
        torch.ops.relora.sst_renormalize_([layers[0].U_active], [], [layers[0].sigma], [layers[0].active])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_renormalize_native_loop_matches_aten_ops(dtype):
    """The CPU loop (contiguous layers) against the ATen path (taken by a non-contiguous layer) and a float64
    reference: unit columns, Σ scaled by the norms, negative Σ clamped, NaN kept."""
    from relora_ext.sst import renormalize_

    def noisy(seed):
        layer = layer_of(9, 13, r=4, seed=seed)[1].to(dtype)
        with torch.no_grad():
            layer.U_active.mul_(torch.linspace(0.5, 3.0, 4, dtype=dtype))
            layer.V_active.add_(0.1)
            layer.sigma[0] = -0.25
            layer.sigma[layer.active[2]] = -1.0
            layer.U_active[:, 3] = 0
        return layer

    fast, slow = noisy(1), noisy(1)
    ref_u, ref_v, ref_s = (t.detach().double().clone() for t in (fast.U_active, fast.V_active, fast.sigma))
    with torch.no_grad():  # the same values, column-major: not contiguous, so the ATen ops run
        slow.U_active.data = slow.U_active.data.t().contiguous().t()
    renormalize_([fast])
    renormalize_([slow])
    nu, nv = ref_u.norm(dim=0), ref_v.norm(dim=0)
    ok = (nu > 0) & (nv > 0)
    ref_u /= torch.where(ok, nu, 1)
    ref_v /= torch.where(ok, nv, 1)
    ref_s[fast.active] *= torch.where(ok, nu * nv, 1)
    ref_s.clamp_min_(0)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-7)
    for got in (fast, slow):
        torch.testing.assert_close(got.U_active.double(), ref_u, **tol)
        torch.testing.assert_close(got.V_active.double(), ref_v, **tol)
        torch.testing.assert_close(got.sigma.double(), ref_s, **tol)
    if dtype != torch.float64:  # norms in double rounded to fp32, then a division in fp32: the same bits
        assert torch.equal(fast.U_active, slow.U_active) and torch.equal(fast.sigma, slow.sigma)
    nan = noisy(2)
    with torch.no_grad():
        nan.sigma[1] = float("nan")
    renormalize_([nan])
    assert torch.isnan(nan.sigma[1]) and bool((nan.sigma[~torch.isnan(nan.sigma)] >= 0).all())


def test_renormalize_a_layer_named_twice_is_renormalized_twice_in_turn():
    from relora_ext.sst import renormalize_

    layer, twin = layer_of(seed=3)[1], layer_of(seed=3)[1]
    with torch.no_grad():
        for m in (layer, twin):
            m.U_active.mul_(torch.tensor([0.5, 2.0, 3.0]))
            m.V_active.mul_(1.5)
    renormalize_([layer, layer])
    renormalize_([twin])
    renormalize_([twin])
    for a, b in ((layer.U_active, twin.U_active), (layer.V_active, twin.V_active), (layer.sigma, twin.sigma)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fault", ["duplicate", "int_sigma", "float8"])
def test_renormalize_refuses_bad_dtypes_and_repeated_directions_before_changing_any(fault):
    from relora_ext.sst import renormalize_

    good, bad = layer_of(seed=1)[1], layer_of(seed=2)[1]
    with torch.no_grad():
        good.U_active.mul_(2.0)
    lists = [[m.U_active for m in (good, bad)], [m.V_active for m in (good, bad)],
             [m.sigma for m in (good, bad)], [m.active for m in (good, bad)]]
    if fault == "duplicate":
        lists[3][1] = torch.tensor([0, 4, 0])
        err, match = ValueError, "layer 1: active must not repeat a direction, got 0 twice"
    elif fault == "int_sigma":
        lists[2][1] = torch.zeros(12, dtype=torch.int32)
        err, match = TypeError, "layer 1: U_active, V_active and sigma must be float32, float64, bfloat16 or float16"
    else:
        lists[0][1] = bad.U_active.detach().to(torch.float8_e4m3fn)
        err, match = TypeError, "must be float32, float64, bfloat16 or float16"
    before = [t.detach().clone() for t in (good.U_active, good.V_active, good.sigma)]
    versions = [t._version for t in (good.U_active, good.V_active, good.sigma)]
    with pytest.raises(err, match=match):
        torch.ops.relora.sst_renormalize_(*lists)
    for t, b, v in zip((good.U_active, good.V_active, good.sigma), before, versions):
        assert torch.equal(t, b) and t._version == v


def test_renormalize_refuses_a_bad_layer_before_changing_any():
    from relora_ext.sst import renormalize_

    good, bad = layer_of(seed=1)[1], layer_of(seed=2)[1]
    with torch.no_grad():
        good.U_active.mul_(2.0)
        bad.active[0] = bad.sigma.numel()   # out of range
    before = [t.detach().clone() for t in (good.U_active, good.V_active, good.sigma)]
    with pytest.raises(IndexError, match="layer 1: active must index sigma's 12 entries"):
        renormalize_([good, bad])
    for t, b in zip((good.U_active, good.V_active, good.sigma), before):
        assert torch.equal(t, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_layer_gradients_and_training_iterations_match_cpu():
    """On CUDA: the layer's output and gradients (fp32, and under bf16 autocast) against the float64 CPU
    layer, then a wrapped model's step with an iteration and a round (sampling, swap, re-SVD) on the GPU
    giving the same active columns as on the CPU (the Philox draw is device-independent)."""
    _, sst64 = layer_of(out=24, inp=40, r=4, dtype=torch.float64)
    sst = SSTLinear.from_linear(nn.Linear(40, 24), r=4).cuda()
    with torch.no_grad():
        for name, t in sst64.named_parameters():
            getattr(sst, name).copy_(t)
        for name, t in sst64.named_buffers():
            getattr(sst, name).copy_(t)
    x64 = torch.randn(3, 7, 40, dtype=torch.float64, requires_grad=True)
    x = x64.detach().float().cuda().requires_grad_()
    R = torch.randn(3, 7, 24, dtype=torch.float64)
    (sst64(x64) * R).sum().backward()
    (sst(x) * R.float().cuda()).sum().backward()
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, rtol=1e-4, atol=1e-4)
    for name, p in sst64.named_parameters():
        torch.testing.assert_close(getattr(sst, name).grad.double().cpu(), p.grad, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = sst(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double().cpu(), sst64(x64).detach(), rtol=3e-2, atol=3e-2)

    def trained(device):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).to(device)
        wrap(model, r=4, method="sst")
        opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=2, seed=3)
        g = torch.Generator().manual_seed(1)
        for _ in range(9):  # 4 iterations: a round (m / r = 4) and its re-SVD
            xb = torch.randn(8, 16, generator=g).to(device)
            model(xb).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return model

    cpu, gpu = trained("cpu"), trained("cuda")
    for a, b in zip(cpu.modules(), gpu.modules()):
        if isinstance(a, SSTLinear):
            assert torch.equal(a.active, b.active.cpu())
            torch.testing.assert_close(b.weight_sst().cpu(), a.weight_sst(), rtol=1e-3, atol=1e-4)


def _bits(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(v.nan_to_num(), before[k].nan_to_num()) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fault", ["nan_in_U", "nan_in_V", "active_out_of_range", "active_duplicate",
                                   "active_wrong_dtype"])
def test_a_bad_frozen_buffer_or_active_set_refuses_the_iteration_before_any_layer_changes(fault):
    # a fault in the second layer (loaded from a file, say) must be found before the first layer is touched,
    # at an iteration with a re-SVD (cycle 2 of layer '2': m = 12, r = 3 -> 4 iterations a round) and without
    model = sst_model()
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-2), model, reset_every=100)
    train(model, opt, 2)
    layer = model[2]
    with torch.no_grad():
        if fault == "nan_in_U":
            layer.U[0, int(layer.active.max()) + 1] = float("nan")
        elif fault == "nan_in_V":
            layer.V[1, int(layer.active.max()) + 1] = float("inf")
    if fault == "active_out_of_range":
        layer.active[0] = 100
    elif fault == "active_duplicate":
        layer.active[1] = layer.active[0]
    elif fault == "active_wrong_dtype":
        layer.active = layer.active.to(torch.int32)
    before, state_before = _bits(model), {id(p): {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                                           for p, st in opt.state.items()}
    with pytest.raises(CycleRefused, match="layer '2'"):
        opt.restart()
    assert _unchanged(model, before) and opt.cycles_done == 0
    for p, st in opt.state.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                assert torch.equal(v, state_before[id(p)][k])
    with pytest.raises(CycleRefused, match="layer '2'"):
        unwrap(model)
    assert isinstance(model[2], SSTLinear)


def test_resample_with_a_bad_seed_changes_nothing():
    lin, layer = layer_of()
    x = torch.randn(3, 20)
    y0, before = layer(x).detach(), _bits(layer)
    for seed in (-5, 2**64, 1.5):
        with pytest.raises((ValueError, TypeError), match="sample_directions: seed"):
            layer.resample_(seed=seed, offset=0)
    assert _unchanged(layer, before) and torch.equal(layer(x), y0)


def test_sample_directions_and_sample_offset_check_their_arguments():
    s = torch.rand(8)
    for r in (0, -1, 9):
        with pytest.raises(ValueError, match="sample_directions: r must be in"):
            sample_directions(s, r, seed=0, offset=0)
    with pytest.raises(TypeError, match="sample_directions: r must be an int"):
        sample_directions(s, 2.0, seed=0, offset=0)
    for bad in (torch.rand(2, 4), torch.rand(0), torch.arange(8)):
        with pytest.raises(ValueError, match="sample_directions: sigma must be a non-empty 1-D floating"):
            sample_directions(bad, 2, seed=0, offset=0)
    with pytest.raises(ValueError, match="sigma holds non-finite"):
        sample_directions(torch.tensor([1.0, float("nan"), 2.0]), 1, seed=0, offset=0)
    with pytest.raises(ValueError, match="sample_offset: layer_index must be in"):
        sample_offset(1 << 29, 0)
    with pytest.raises(ValueError, match="sample_offset: iteration must be in"):
        sample_offset(0, 1 << 32)
    assert sample_offset((1 << 29) - 1, (1 << 32) - 1) < 2**64


def test_to_linear_and_unwrap_of_a_layer_refuse_non_finite_values():
    _, layer = layer_of()
    with torch.no_grad():
        layer.sigma[0] = float("nan")
    for fn in (layer.to_linear, lambda: unwrap(layer)):
        with pytest.raises(CycleRefused, match="sigma holds non-finite"):
            fn()


def test_from_linear_refuses_a_non_finite_weight():
    lin = nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match="SSTLinear.from_linear: the weight holds non-finite"):
        SSTLinear.from_linear(lin, r=2)
    model = nn.Sequential(lin)
    with pytest.raises(ValueError, match="non-finite"):
        wrap(model, r=2, method="sst")
    assert type(model[0]) is nn.Linear


def test_wrap_sst_with_freeze_others_trains_sigma_and_the_active_columns_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8))
    wrap(model, r=2, method="sst", target_modules=["0"], freeze_others=True)
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained == ["0.U_active", "0.V_active", "0.sigma"]
    with pytest.raises(ValueError, match="r must satisfy.*got r=13"):
        wrap(nn.Sequential(nn.Linear(12, 16)), r=13, method="sst")
    with pytest.raises(ValueError, match="SSTLinear.from_linear"):
        wrap(nn.Sequential(nn.Linear(12, 16)), r=13, method="sst")
    with pytest.raises(ValueError, match="already wrapped.*SSTLinear"):
        wrap(model, r=2, method="sst", target_modules=["0"])


def test_merged_state_dict_of_an_sst_model_loads_into_the_plain_architecture():
    from relora_ext.hf import merged_state_dict

    model = sst_model()
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-2), model, reset_every=2)
    train(model, opt, 5)
    plain = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 16))
    plain.load_state_dict(merged_state_dict(model))  # strict
    x = torch.randn(4, 16)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model[0].U_active[0, 0] = float("nan")
    with pytest.raises(CycleRefused, match="merged_state_dict: refused.*layer '0'"):
        merged_state_dict(model)


def test_renormalize_does_not_overflow_on_large_columns():
    _, layer = layer_of()
    x = torch.randn(3, 20)
    with torch.no_grad():
        layer.U_active.mul_(1e20)   # the function is kept by scaling Σ of the active directions down
        layer.sigma[layer.active] *= 1e-20
    y0 = layer(x).detach()
    layer.renormalize_()
    assert bool(torch.isfinite(layer.sigma).all())
    torch.testing.assert_close(layer.U_active.norm(dim=0), torch.ones(3))
    torch.testing.assert_close(layer(x), y0, rtol=1e-4, atol=1e-5)


def test_renormalize_takes_any_iterable_and_names_a_foreign_module():
    from relora_ext.sst import renormalize_

    torch.manual_seed(0)
    model = torch.nn.Sequential(SSTLinear(6, 5, r=2), torch.nn.Tanh(), SSTLinear(5, 4, r=2))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.U_active.mul_(3.0)
    renormalize_(m for m in model.modules() if isinstance(m, SSTLinear))  # a generator
    for m in (model[0], model[2]):
        torch.testing.assert_close(m.U_active.norm(dim=0), torch.ones(2))
    with pytest.raises(TypeError, match="SSTLinear modules, got Tanh at index 1"):
        renormalize_([model[0], model[1]])
