"""LoRAEmbedding: drop-in nn.Embedding behaviour, forward and gradients against a float64 reference, the
ReLoRA* merge and reset, refusals."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from relora_ext import CycleRefused, ops
from relora_ext.embedding import LoRAEmbedding

SHAPES = [(50, 12, 4), (7, 3, 1), (1, 5, 1), (33, 17, 5), (300, 8, 8)]  # (vocab, d, r), odd ones included


def randomize(layer, std=0.3, seed=0):
    """Nonzero factors (A is zero after init), padding column kept at zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * std)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)
        if layer.padding_idx is not None:
            layer.lora_A[:, layer.padding_idx] = 0


def reference(ids, E, A, B, s):
    """float64 oracle: E[t] + s · (A[:, t]ᵀ Bᵀ) for every id t."""
    d = torch.float64
    return E.to(d)[ids] + s * A.to(d).t()[ids] @ B.to(d).t()


def ulp(t):
    """One unit in the last place of each entry of t (bf16/fp16/fp32), as float64."""
    mant = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[t.dtype]
    _, e = torch.frexp(t.double())
    return torch.where(t == 0, torch.full_like(t, torch.finfo(t.dtype).tiny, dtype=torch.float64),
                       torch.ldexp(torch.ones_like(t, dtype=torch.float64), e - mant))


# --- construction -------------------------------------------------------------------------------


def test_constructor_parameters_and_init():
    torch.manual_seed(0)
    layer = LoRAEmbedding(1000, 64, r=16, padding_idx=3)
    assert (layer.num_embeddings, layer.embedding_dim, layer.r, layer.padding_idx) == (1000, 64, 16, 3)
    assert layer.weight.shape == (1000, 64) and not layer.weight.requires_grad
    assert layer.lora_A.shape == (16, 1000) and layer.lora_B.shape == (64, 16)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert torch.count_nonzero(layer.lora_A) == 0  # the looked-up factor starts at zero
    assert layer.init_std == pytest.approx(1 / math.sqrt(16))
    assert layer.lora_B.std().item() == pytest.approx(1 / 4, rel=0.1)
    assert layer.alpha == 16.0 and layer.scaling == 1.0
    assert torch.count_nonzero(layer.weight[3]) == 0  # like nn.Embedding: the padding row zero
    assert repr(layer) == "LoRAEmbedding(1000, 64, padding_idx=3, r=16, alpha=16.0)"
    assert LoRAEmbedding(10, 4, r=2, padding_idx=-1).padding_idx == 9
    other = LoRAEmbedding(10, 4, r=2, alpha=1.0, init_std=0.5, dtype=torch.bfloat16)
    assert other.scaling == 0.5 and other.init_std == 0.5 and other.lora_A.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_norm=1.0), "max_norm must be None"),
    (dict(scale_grad_by_freq=True), "scale_grad_by_freq must be False"),
    (dict(sparse=True), "sparse must be False"),
])
def test_refused_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAEmbedding(10, 4, r=2, **kwargs)
    emb = nn.Embedding(10, 4, **kwargs)
    with pytest.raises(ValueError, match="LoRAEmbedding.from_embedding: " + match):
        LoRAEmbedding.from_embedding(emb, r=2)
    assert emb.weight.requires_grad  # refused before anything was adopted


def test_refused_arguments():
    with pytest.raises(ValueError, match=r"r must satisfy 1 <= r <= min\(in_features, out_features\) = 4"):
        LoRAEmbedding(10, 4, r=5)
    with pytest.raises(TypeError, match="emb must be an nn.Embedding, got Linear"):
        LoRAEmbedding.from_embedding(nn.Linear(4, 4), r=2)
    with pytest.raises(TypeError, match="weight_dtype must be None or one of"):
        LoRAEmbedding(10, 4, r=2, weight_dtype=torch.float64)
    with pytest.raises(ValueError, match="num_embeddings must be >= 1"):
        LoRAEmbedding(0, 4, r=1)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        LoRAEmbedding(10, 4, r=2, alpha=0.0)


def test_from_embedding_adopts_without_copy():
    emb = nn.Embedding(40, 8, padding_idx=0)
    ptr = emb.weight.data_ptr()
    lora = LoRAEmbedding.from_embedding(emb, r=4)
    assert lora.weight is emb.weight and lora.weight.data_ptr() == ptr and not lora.weight.requires_grad
    assert lora.padding_idx == 0
    ids = torch.randint(0, 40, (3, 7))
    assert torch.equal(lora(ids), F.embedding(ids, emb.weight))  # A = 0: the adapter starts as a no-op
    half = nn.Embedding(40, 8)
    w = half.weight
    lora16 = LoRAEmbedding.from_embedding(half, r=4, weight_dtype=torch.bfloat16)
    assert lora16.weight is w and w.dtype == torch.bfloat16 and lora16.lora_B.dtype == torch.float32


# --- forward and gradients against float64 --------------------------------------------------------


@pytest.mark.parametrize("vocab,d,r", SHAPES)
@pytest.mark.parametrize("ids_shape", [(), (5,), (3, 4)])
def test_forward_and_gradients_match_float64(vocab, d, r, ids_shape):
    torch.manual_seed(vocab + d + r)
    layer = LoRAEmbedding(vocab, d, r=r, alpha=2.0 * r)  # s = 2
    randomize(layer)
    ids = torch.randint(0, vocab, ids_shape)
    y = layer(ids)
    assert y.shape == (*ids_shape, d) and y.dtype == torch.float32
    E64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (layer.weight, layer.lora_A, layer.lora_B))
    ref = reference(ids, E64, A64, B64, layer.scaling)
    assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)
    g = torch.randn(y.shape, dtype=torch.float64)
    y.backward(g.float())
    ref.backward(g)
    assert_close(layer.lora_A.grad.double(), A64.grad, rtol=1e-5, atol=1e-6)
    assert_close(layer.lora_B.grad.double(), B64.grad, rtol=1e-5, atol=1e-6)
    assert layer.weight.grad is None
    # sparse in effect: only the looked-up columns of A take a gradient
    unseen = torch.ones(vocab, dtype=torch.bool)
    unseen[ids.reshape(-1)] = False
    assert torch.count_nonzero(layer.lora_A.grad[:, unseen]) == 0


def test_int32_ids_and_out_of_range():
    layer = LoRAEmbedding(20, 6, r=3)
    randomize(layer)
    ids = torch.tensor([[0, 19, 5]])
    assert torch.equal(layer(ids.int()), layer(ids))
    with pytest.raises(IndexError):
        layer(torch.tensor([20]))


def test_autocast_keeps_the_factors_dtype():
    # nn.Embedding is not autocast: its fp32 output feeds the residual stream; so must this layer's
    layer = LoRAEmbedding(30, 16, r=4)
    randomize(layer)
    ids = torch.randint(0, 30, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(ids)
    assert y.dtype == torch.float32
    assert_close(y, layer(ids), rtol=1e-2, atol=1e-2)


def test_bf16_table_forward():
    layer = LoRAEmbedding(30, 16, r=4, weight_dtype=torch.bfloat16)
    randomize(layer)
    ids = torch.randint(0, 30, (4,))
    assert_close(layer(ids).double(), reference(ids, layer.weight, layer.lora_A, layer.lora_B, 1.0),
                 rtol=1e-6, atol=1e-6)


# --- padding_idx -----------------------------------------------------------------------------------


def test_padding_row_never_changes():
    torch.manual_seed(0)
    layer = LoRAEmbedding(25, 8, r=3, padding_idx=2)
    pad_row, row5 = layer.weight[2].clone(), layer.weight[5].clone()
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=0.1, weight_decay=0.1)
    ids = torch.tensor([[2, 5, 2, 7], [1, 2, 2, 9]])
    for step in range(6):
        out = layer(ids)
        assert torch.equal(out[0, 0], pad_row)
        (out * torch.randn(out.shape)).sum().backward()  # a nonzero gradient at the padding positions too
        assert torch.count_nonzero(layer.lora_A.grad[:, 2]) == 0  # no gradient into the padding column
        opt.step()
        opt.zero_grad()
        if step % 2 == 1:
            layer.merge_and_reset_(seed=0, offset=step)
    assert torch.equal(layer.weight[2], pad_row)
    assert not torch.equal(layer.weight[5], row5)  # a trained row did change


def test_nonzero_padding_column_refused():
    layer = LoRAEmbedding(10, 4, r=2, padding_idx=1)
    with torch.no_grad():
        layer.lora_A[:, 1] = 1.0
    before = [t.clone() for t in (layer.weight, layer.lora_A, layer.lora_B)]
    with pytest.raises(CycleRefused, match=r"lora_A\[:, padding_idx=1\] is nonzero"):
        layer.merge_and_reset_(seed=0)
    for t, b in zip((layer.weight, layer.lora_A, layer.lora_B), before):
        assert torch.equal(t, b)


# --- merge and reset ------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab,d,r", SHAPES)
def test_merge_and_reset_keeps_the_function(vocab, d, r):
    torch.manual_seed(1)
    layer = LoRAEmbedding(vocab, d, r=r)
    randomize(layer)
    ids = torch.arange(vocab)
    y0 = layer(ids).detach()
    A0 = layer.lora_A.detach().clone()
    layer.merge_and_reset_(seed=7, offset=3)
    assert torch.count_nonzero(layer.lora_A) == 0
    drawn, zeros = torch.empty_like(layer.lora_B), torch.empty_like(A0)
    ops.reset_(drawn, zeros, std=layer.init_std, seed=7, offset=3)  # B drawn from the Philox stream (7, 3)
    assert torch.equal(layer.lora_B, drawn)
    assert_close(layer(ids).detach(), y0, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_is_one_rounding_of_the_fp32_sum(table_dtype):
    torch.manual_seed(2)
    vocab, d, r = 67, 33, 5
    layer = LoRAEmbedding(vocab, d, r=r, alpha=3.0, weight_dtype=table_dtype)
    randomize(layer, std=0.2)
    E0 = layer.weight.detach().clone()
    layer.merge_()
    exact = E0.double() + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double()).t()
    ref = exact.to(table_dtype)  # one rounding of the (nearly exact) sum
    assert layer.weight.dtype == table_dtype
    err = (layer.weight.double() - ref.double()).abs()
    # one rounding into the table's dtype, plus the fp32 accumulation's own error (a few fp32 ulps of the
    # terms summed: what matters where the sum cancels)
    terms = E0.double().abs() + layer.scaling * (layer.lora_B.double().abs() @ layer.lora_A.double().abs()).t()
    bound = ulp(ref) + 4 * 2.0 ** -24 * terms
    assert bool((err <= bound).all()), f"max error {err.max():.3g}"
    assert (layer.weight != E0).float().mean() > 0.9  # the update is not lost to the rounding
    if table_dtype != torch.float32:  # in fp32 only the sum's order may differ; in 16 bits the rounding rules
        assert (layer.weight == ref).float().mean() > 0.99


def test_merge_alone_counts_the_update_twice_until_reset():
    layer = LoRAEmbedding(12, 6, r=2)
    randomize(layer)
    ids = torch.arange(12)
    y0 = layer(ids).detach()
    delta = y0 - F.embedding(ids, layer.weight)
    layer.merge_()
    assert_close(layer(ids).detach(), y0 + delta, rtol=1e-5, atol=1e-6)


# --- check() and refusals ------------------------------------------------------------------------


def snapshot(layer):
    return [t.detach().clone() for t in (layer.weight, layer.lora_A, layer.lora_B)]


def assert_unchanged(layer, snap):
    for t, b in zip((layer.weight, layer.lora_A, layer.lora_B), snap):
        assert torch.equal(t, b)


@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
def test_nan_factor_refused_without_change(which):
    layer = LoRAEmbedding(15, 6, r=2)
    randomize(layer)
    with torch.no_grad():
        getattr(layer, which)[0, 0] = float("nan")
    snap = snapshot(layer)
    assert "non-finite" in layer.check()
    with pytest.raises(CycleRefused, match=f"{which} holds non-finite values"):
        layer.merge_and_reset_(seed=0)
    with pytest.raises(CycleRefused, match="LoRAEmbedding.to_base: refused"):
        layer.to_base()
    for t, b in zip((layer.weight, layer.lora_A, layer.lora_B), snap):
        assert torch.equal(t, b) or (t.isnan() == b.isnan()).all() and torch.equal(t.nan_to_num(), b.nan_to_num())


def test_wrong_shapes_refused():
    layer = LoRAEmbedding(15, 6, r=2)
    layer.lora_A = nn.Parameter(torch.zeros(3, 15))
    layer.lora_B = nn.Parameter(torch.zeros(6, 3))  # consistent with each other, not with r = 2
    assert layer.check() == "lora_A has shape (3, 15), expected (2, 15)"
    snap = snapshot(layer)
    with pytest.raises(CycleRefused, match=r"lora_A has shape \(3, 15\)"):
        layer.merge_and_reset_(seed=0)
    assert_unchanged(layer, snap)
    layer = LoRAEmbedding(15, 6, r=2)
    layer.lora_B = nn.Parameter(torch.zeros(2, 6))
    assert layer.check() == "lora_B has shape (2, 6), expected (6, 2)"


def test_settings_validated_on_assignment():
    layer = LoRAEmbedding(15, 6, r=2)
    with pytest.raises(TypeError, match="LoRAEmbedding: alpha must be a real number, got bool"):
        layer.alpha = True
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        layer.alpha = float("inf")
    with pytest.raises(ValueError, match="init_std must be a finite number"):
        layer.init_std = -1.0
    assert layer.alpha == 2.0 and layer.init_std == pytest.approx(1 / math.sqrt(2))
    layer.alpha = 4
    assert layer.scaling == 2.0


def test_factor_dtype_refused_by_check():
    layer = LoRAEmbedding(15, 6, r=2)
    layer.lora_A = nn.Parameter(torch.zeros(2, 15, dtype=torch.float64))
    assert "lora_A is torch.float64" in layer.check()


# --- to_base ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_dtype", [None, torch.bfloat16])
def test_to_base_merges_into_the_same_parameter(weight_dtype):
    emb = nn.Embedding(40, 8, padding_idx=4)
    emb.weight.requires_grad_(False)  # a frozen table stays frozen after to_base
    lora = LoRAEmbedding.from_embedding(emb, r=3, weight_dtype=weight_dtype)
    randomize(lora)
    ids = torch.randint(0, 40, (5, 3))
    y = lora(ids).detach()
    base = lora.to_base()
    assert type(base) is nn.Embedding and base.weight is emb.weight and base.padding_idx == 4
    assert base.weight.dtype == torch.float32 and not base.weight.requires_grad
    tol = 1e-2 if weight_dtype else 2e-6
    assert_close(base(ids), y, rtol=tol, atol=tol)
    assert_close(lora(ids).detach(), base(ids))  # A zeroed: the adapter still computes the same function
    assert LoRAEmbedding(6, 4, r=2).to_base().weight.requires_grad  # built from scratch: trainable


def test_sharded_table_refused(monkeypatch):
    import relora_ext.embedding as embedding

    layer = LoRAEmbedding(10, 4, r=2)
    monkeypatch.setattr(embedding, "is_dtensor", lambda t: t is layer.weight)
    assert "sharded (FSDP2 DTensor) LoRAEmbedding is not supported" in layer.check()


# --- in ReLoRAOptimizer's cycle ----------------------------------------------------------------------


def test_cycled_by_relora_optimizer():
    from relora_ext import ReLoRAOptimizer
    from relora_ext.cycle import reset_offset

    torch.manual_seed(0)
    model = nn.Sequential(LoRAEmbedding(40, 8, r=2), nn.Linear(8, 40))
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=2, seed=5)
    ids = torch.randint(0, 40, (4, 6))
    E0 = model[0].weight.clone()
    for _ in range(2):
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        opt.step()
        opt.zero_grad()
    emb = model[0]
    assert opt.cycles_done == 1 and torch.count_nonzero(emb.lora_A) == 0
    assert not torch.equal(emb.weight, E0)  # the update was merged into the table
    drawn, zeros = torch.empty_like(emb.lora_B), torch.empty_like(emb.lora_A)
    ops.reset_(drawn, zeros, std=emb.init_std, seed=5, offset=reset_offset(0, 0))
    assert torch.equal(emb.lora_B, drawn)
    for p in (emb.lora_A, emb.lora_B):  # 99% magnitude pruning of both factors' state
        st = opt.state[p]
        assert torch.count_nonzero(st["exp_avg_sq"]) <= p.numel() - int(0.99 * p.numel())


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    layer = LoRAEmbedding(50, 8, r=2, padding_idx=0)
    randomize(layer)
    ids = torch.randint(0, 50, (3, 4))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(ids)
    y.backward(torch.ones_like(y))
    grads = (layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    layer.zero_grad()
    y_eager = layer(ids)
    y_eager.backward(torch.ones_like(y_eager))
    assert torch.equal(y, y_eager)
    assert torch.equal(grads[0], layer.lora_A.grad) and torch.equal(grads[1], layer.lora_B.grad)
    torch._dynamo.reset()


def test_checkpoint_resumes_exactly(tmp_path):
    import relora_ext

    ids = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(3))

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(LoRAEmbedding(40, 8, r=2, padding_idx=0), nn.Linear(8, 40))
        opt = relora_ext.ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=3, seed=1)
        return model, opt

    def train(model, opt, n):
        for _ in range(n):
            F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
            opt.step()
            opt.zero_grad()

    model, opt = make()
    train(model, opt, 4)  # one cycle done, the next one inside the resumed part
    relora_ext.save_checkpoint(tmp_path / "ck.pt", model=model, optimizer=opt)
    train(model, opt, 4)
    model2, opt2 = make()
    relora_ext.load_checkpoint(tmp_path / "ck.pt", model=model2, optimizer=opt2)
    train(model2, opt2, 4)
    assert opt2.cycles_done == opt.cycles_done == 2
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    plain = relora_ext.unwrap(model)
    assert type(plain[0]) is nn.Embedding and plain[0].padding_idx == 0
