"""LoRALinear, wrap and unwrap: drop-in behaviour, numerics against float64 references, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from relora_ext import LoRALinear, lora_layers, unwrap, wrap


def reference_lora(x, layer):
    """float64 oracle: x Wᵀ + b + s (x Aᵀ) Bᵀ."""
    d = torch.float64
    y = x.to(d) @ layer.weight.to(d).T + layer.scaling * (x.to(d) @ layer.lora_A.to(d).T) @ layer.lora_B.to(d).T
    if layer.bias is not None:
        y = y + layer.bias.to(d)
    return y


def randomize_B(layer, std=0.1):
    with torch.no_grad():
        layer.lora_B.normal_(0, std)


def ulp(t):
    """One unit in the last place of each entry of t (a bf16/fp16/fp32 tensor), as float64."""
    mant_bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[t.dtype]
    _, e = torch.frexp(t.double())
    tiny = torch.finfo(t.dtype).tiny
    return torch.where(t == 0, torch.full_like(t, tiny, dtype=torch.float64), torch.ldexp(torch.ones_like(t, dtype=torch.float64), e - mant_bits))


# --- construction and drop-in behaviour ------------------------------------------------------------


def test_constructor_head_and_parameters():
    torch.manual_seed(0)
    layer = LoRALinear(64, 48, True, None, torch.float32, r=8)
    assert (layer.in_features, layer.out_features, layer.r) == (64, 48, 8)
    assert layer.weight.shape == (48, 64) and not layer.weight.requires_grad
    assert layer.bias.shape == (48,) and layer.bias.requires_grad
    assert layer.lora_A.shape == (8, 64) and layer.lora_B.shape == (48, 8)
    assert torch.count_nonzero(layer.lora_B) == 0
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["bias", "lora_A", "lora_B"]
    assert layer.alpha == 8.0 and layer.scaling == 1.0  # default alpha = r
    assert layer.init_std == pytest.approx(1 / math.sqrt(64))
    assert "in_features=64, out_features=48, bias=True, r=8" in repr(layer)
    nobias = LoRALinear(8, 4, bias=False, r=2, alpha=4, dropout=0.1, init_std=0.5)
    assert nobias.bias is None and nobias.scaling == 2.0 and nobias.init_std == 0.5
    assert "dropout=0.1" in repr(nobias)


def test_init_std_of_A():
    torch.manual_seed(0)
    layer = LoRALinear(1024, 512, r=64)
    assert layer.lora_A.std().item() == pytest.approx(1 / 32, rel=0.02)
    assert LoRALinear(16, 16, r=4, init_std=0.0).lora_A.abs().sum() == 0


def test_starts_as_exact_noop_and_matches_reference():
    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    layer = LoRALinear.from_linear(lin, r=4)
    x = torch.randn(2, 3, 5, 32)  # any leading dims
    assert torch.equal(layer(x), lin(x))
    randomize_B(layer)
    y = layer(x)
    assert y.shape == (2, 3, 5, 24)
    assert_close(y.double(), reference_lora(x, layer), rtol=1e-5, atol=1e-5)
    layer2 = LoRALinear(32, 24, r=4, alpha=12.0)
    randomize_B(layer2)
    assert_close(layer2(x).double(), reference_lora(x, layer2), rtol=1e-5, atol=1e-5)


def test_from_linear_adopts_without_copy():
    lin = nn.Linear(16, 8)
    w_ptr = lin.weight.data_ptr()
    layer = LoRALinear.from_linear(lin, r=2)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert layer.weight.data_ptr() == w_ptr
    assert not lin.weight.requires_grad
    bf = nn.Linear(16, 8, dtype=torch.bfloat16)
    lb = LoRALinear.from_linear(bf, r=2)
    assert lb.lora_A.dtype == torch.bfloat16 and lb.lora_B.dtype == torch.bfloat16


def test_to_linear_shares_and_merges():
    torch.manual_seed(0)
    layer = LoRALinear(16, 8, r=2)
    randomize_B(layer)
    x = torch.randn(4, 16)
    ref = reference_lora(x, layer)
    lin = layer.to_linear()
    assert type(lin) is nn.Linear and lin.weight is layer.weight and lin.bias is layer.bias
    assert lin.weight.requires_grad
    assert_close(lin(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert_close(layer(x), lin(x))  # B was zeroed: the layer still computes the same function


def test_dropout_only_on_adapter_path_and_eval_deterministic():
    torch.manual_seed(0)
    layer = LoRALinear(32, 32, r=4, dropout=0.5)
    randomize_B(layer)
    x = torch.randn(16, 32)
    layer.eval()
    assert_close(layer(x).double(), reference_lora(x, layer), rtol=1e-5, atol=1e-5)
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y2)
    with torch.no_grad():  # the frozen path never sees dropout: with B = 0 the output is exact
        layer.lora_B.zero_()
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


# --- autograd, autocast, compile --------------------------------------------------------------------


def test_gradcheck_float64():
    torch.manual_seed(0)
    layer = LoRALinear(6, 5, r=3, alpha=1.5, dtype=torch.float64)
    randomize_B(layer, 0.5)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)

    def f(x, A, B, b):
        return torch.func.functional_call(layer, {"lora_A": A, "lora_B": B, "bias": b, "weight": layer.weight}, (x,))

    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, A, B, b))
    assert torch.autograd.gradgradcheck(f, (x, A, B, b))


def test_weight_gets_no_grad():
    layer = LoRALinear(8, 8, r=2)
    layer(torch.randn(3, 8)).sum().backward()
    assert layer.weight.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and layer.bias.grad is not None


def test_autocast_bf16_cpu():
    torch.manual_seed(0)
    layer = LoRALinear(64, 32, r=8)
    randomize_B(layer)
    x = torch.randn(10, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_close(y.double(), reference_lora(x, layer), rtol=3e-2, atol=5e-2)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0


def test_torch_compile_tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(16, 32, r=4), nn.GELU(), LoRALinear(32, 8, r=4, alpha=8))
    for layer in (model[0], model[2]):
        randomize_B(layer)
    x = torch.randn(5, 16)
    y_ref = model(x)
    y_ref.square().sum().backward()
    grads_ref = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    compiled = torch.compile(model)
    y = compiled(x)
    y.square().sum().backward()
    assert_close(y, y_ref)
    for g, p in zip(grads_ref, [p for p in model.parameters() if p.requires_grad]):
        assert_close(p.grad, g)


# --- merge + reset ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_reset_preserves_function_within_one_rounding(dtype):
    torch.manual_seed(0)
    layer = LoRALinear(48, 40, r=6, alpha=3.0, dtype=dtype)
    randomize_B(layer, 0.3)
    W0 = layer.weight.detach().double().clone()
    A0, B0 = layer.lora_A.detach().double().clone(), layer.lora_B.detach().double().clone()
    x = torch.randn(64, 48, dtype=torch.float64)
    y_before = reference_lora(x, layer)
    layer.merge_and_reset_(seed=1, offset=7)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert not torch.equal(layer.lora_A.double(), A0)
    exact = W0 + layer.scaling * B0 @ A0
    W1 = layer.weight.detach()
    # one rounding of W (a full ulp allowed) plus the fp32 accumulation error of s·B·A
    tol = ulp(W1) + layer.scaling * (B0.abs() @ A0.abs()) * (layer.r + 2) * 2.0**-24
    assert (W1.double() - exact).abs().le(tol).all()
    y_after = reference_lora(x, layer)
    bound = x.abs() @ tol.T
    assert (y_after - y_before).abs().le(bound + 1e-12).all()
    # and through the module's own forward for every random input
    with torch.no_grad():
        assert_close(layer(x.to(dtype)).double(), y_before, **(dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)))


def test_reset_draw_depends_on_seed_and_offset_only():
    a, b = LoRALinear(16, 16, r=4), LoRALinear(16, 16, r=4)
    a.merge_and_reset_(seed=5, offset=3)
    b.merge_and_reset_(seed=5, offset=3)
    assert torch.equal(a.lora_A, b.lora_A)
    b.merge_and_reset_(seed=5, offset=4)
    assert not torch.equal(a.lora_A, b.lora_A)
    assert a.lora_A.std().item() == pytest.approx(0.25, rel=0.3)


def test_saddle_right_after_reset():
    torch.manual_seed(0)
    layer = LoRALinear(16, 12, r=3)
    randomize_B(layer)
    layer.merge_and_reset_(seed=0, offset=0)
    x = torch.randn(8, 16)
    (layer(x) - torch.randn(8, 12)).square().mean().backward()
    assert torch.count_nonzero(layer.lora_A.grad) == 0
    assert torch.count_nonzero(layer.lora_B.grad) > 0


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0, -1, 9])
def test_bad_rank(r):
    with pytest.raises(ValueError, match=r"r must satisfy 1 <= r <= min\(in_features, out_features\) = 8.*got r="):
        LoRALinear(8, 16, r=r)
    with pytest.raises(ValueError, match="r must satisfy"):
        LoRALinear.from_linear(nn.Linear(8, 16), r=r)


def test_bad_arguments():
    with pytest.raises(TypeError, match="r must be an int, got float"):
        LoRALinear(8, 8, r=2.0)
    with pytest.raises(ValueError, match=r"dropout must be a finite number in \[0.0, 1.0\), got 1.0"):
        LoRALinear(8, 8, r=2, dropout=1.0)
    with pytest.raises(ValueError, match="alpha must be"):
        LoRALinear(8, 8, r=2, alpha=0)
    with pytest.raises(ValueError, match="init_std must be"):
        LoRALinear(8, 8, r=2, init_std=float("nan"))
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        LoRALinear(0, 8, r=1)
    with pytest.raises(TypeError, match="linear must be an nn.Linear or a transformers Conv1D, got Conv1d"):
        LoRALinear.from_linear(nn.Conv1d(2, 2, 1), r=1)


def test_merge_refuses_nonfinite_adapter():
    layer = LoRALinear(8, 8, r=2)
    with torch.no_grad():
        layer.lora_B.fill_(float("nan"))
    W = layer.weight.clone()
    with pytest.raises(ValueError):
        layer.merge_and_reset_(seed=0)
    assert torch.equal(layer.weight, W)


# --- wrap / unwrap --------------------------------------------------------------------------------------


class TinyLM(nn.Module):
    def __init__(self, tied=True):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(16, 16), "v_proj": nn.Linear(16, 16), "mlp": nn.Linear(16, 16)})
            for _ in range(2)
        )
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.lm_head = nn.Linear(16, 50, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for blk in self.blocks:
            h = h + blk["mlp"](torch.tanh(blk["q_proj"](h) + blk["v_proj"](h)))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.lm_head(h)


def wrapped_names(model):
    return [n for n, _ in lora_layers(model)]


def test_wrap_default_selection_skips_head_tied_and_mha():
    model = wrap(TinyLM(), r=2)
    assert wrapped_names(model) == [f"blocks.{i}.{k}" for i in range(2) for k in ("q_proj", "v_proj", "mlp")]
    assert type(model.lm_head) is nn.Linear and type(model.attn.out_proj) is not LoRALinear
    untied = TinyLM(tied=False)
    untied.head2 = nn.Linear(16, 16)
    untied.output = nn.Linear(16, 16)
    assert "head2" in wrapped_names(wrap(untied, r=2)) and "output" not in wrapped_names(untied)


def test_wrap_selectors():
    assert wrapped_names(wrap(TinyLM(), r=2, target_modules=["q_proj"])) == ["blocks.0.q_proj", "blocks.1.q_proj"]
    assert wrapped_names(wrap(TinyLM(), r=2, target_modules=r"blocks\.1\..*")) == [
        "blocks.1.q_proj", "blocks.1.v_proj", "blocks.1.mlp"]
    assert wrapped_names(wrap(TinyLM(tied=False), r=2, target_modules=lambda n, m: m.out_features == 50)) == ["lm_head"]
    assert wrapped_names(wrap(TinyLM(), r=2, exclude_modules=["mlp", "v_proj"])) == ["blocks.0.q_proj", "blocks.1.q_proj"]
    with pytest.raises(ValueError, match=r"no linear layer \(nn.Linear, transformers Conv1D\) of TinyLM matched target_modules=\['proj'\].*blocks.0.q_proj"):
        wrap(TinyLM(), r=2, target_modules=["proj"])


def test_wrap_errors():
    with pytest.raises(ValueError, match=r"no linear layer \(nn.Linear, transformers Conv1D\) of Sequential matched"):
        wrap(nn.Sequential(nn.Conv1d(2, 2, 1)), r=1)
    with pytest.raises(ValueError, match=r"cannot adapt layer 'lm_head'.*r must satisfy"):
        wrap(TinyLM(tied=False), r=17, target_modules=["lm_head"])
    with pytest.raises(TypeError, match="target_modules must be None, a regex str"):
        wrap(TinyLM(), r=2, target_modules=3)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        wrap("model", r=2)


def test_wrap_trains_only_what_relora_trains():
    model = wrap(TinyLM(tied=False), r=2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"blocks.{i}.{k}.weight" for i in range(2) for k in ("q_proj", "v_proj", "mlp")}


def test_unwrap_then_strict_load_gives_same_outputs():
    torch.manual_seed(0)
    model = wrap(TinyLM(), r=2)
    for _, layer in lora_layers(model):
        randomize_B(layer)
    ids = torch.randint(0, 50, (3, 7))
    model.eval()
    y = model(ids)
    unwrapped = unwrap(model)
    assert not lora_layers(unwrapped)
    plain = TinyLM().eval()
    plain.load_state_dict(unwrapped.state_dict(), strict=True)
    assert_close(plain(ids), y, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in plain.parameters())


def test_transformers_llama_wrap_unwrap():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 9))
    y0 = model(ids).logits
    wrap(model, r=4)
    names = wrapped_names(model)
    assert len(names) == 2 * 7 and all(n.startswith("model.layers.") for n in names)
    assert type(model.lm_head) is nn.Linear
    assert_close(model(ids).logits, y0)  # B = 0: exact no-op
    for _, layer in lora_layers(model):
        randomize_B(layer, 0.05)
    y1 = model(ids).logits
    unwrap(model)
    plain = transformers.LlamaForCausalLM(cfg).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    assert_close(plain(ids).logits, y1, rtol=1e-4, atol=1e-4)
    q = wrap(transformers.LlamaForCausalLM(cfg), r=4, target_modules=["q_proj", "v_proj"])
    assert len(wrapped_names(q)) == 4


def test_reset_parameters_like_nn_linear():
    layer = LoRALinear(32, 16, r=4)
    randomize_B(layer)
    w = layer.weight.clone()
    layer.reset_parameters()
    assert not torch.equal(layer.weight, w) and torch.count_nonzero(layer.lora_B) == 0
    assert layer.weight.abs().max() <= 1 / math.sqrt(32) and not layer.weight.requires_grad
