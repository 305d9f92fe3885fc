"""LoRALinear's fused forward (_LoRALinearFn) against the plain autograd composition it replaces."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from relora_ext import LoRALinear


def plain_forward(layer, x):
    """The unfused expression: F.linear(x, W, b) + s · F.linear(F.linear(x, A), B)."""
    lora = F.linear(F.linear(x, layer.lora_A), layer.lora_B)
    return F.linear(x, layer.weight, layer.bias) + layer.scaling * lora


def make(in_f=24, out_f=20, r=4, bias=True, alpha=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(in_f, out_f, bias=bias, r=r, alpha=alpha, dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
    return layer


def grads(layer, x, y, g):
    params = [p for p in (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B)
              if p is not None and p.requires_grad]
    return torch.autograd.grad(y, params, g)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("alpha", [None, 3.0])
@pytest.mark.parametrize("shape", [(7,), (3, 7), (2, 3, 5), (0, 4)])
@pytest.mark.parametrize("r", [4, 18])  # both forms of ∂B: (s hᵀ G)ᵀ up to rank 16, s Gᵀ h above
def test_matches_plain_forward_and_grads(bias, alpha, shape, r):
    layer = make(bias=bias, alpha=alpha, r=r)
    x = torch.randn(*shape, 24, requires_grad=True)
    y, y_ref = layer(x), plain_forward(layer, x)
    assert y.shape == (*shape, 20)
    assert_close(y, y_ref)
    g = torch.randn_like(y)
    for a, b in zip(grads(layer, x, y, g), grads(layer, x, y_ref, g)):
        assert_close(a, b)


def test_noncontiguous_input_and_trainable_weight():
    layer = make()
    layer.weight.requires_grad_(True)  # e.g. a user who unfreezes W: it gets Gᵀx
    x = torch.randn(24, 6, requires_grad=True).T  # (6, 24), not contiguous
    y, y_ref = layer(x), plain_forward(layer, x)
    g = torch.randn_like(y)
    for a, b in zip(grads(layer, x, y, g), grads(layer, x, y_ref, g)):
        assert_close(a, b)


def test_saves_only_x_and_hidden():
    layer = make(in_f=32, out_f=48, r=4)
    x = torch.randn(16, 32, requires_grad=True)
    param_ptrs = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in param_ptrs:
            saved[t.untyped_storage().data_ptr()] = tuple(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    assert sorted(saved.values()) == [(16, 4), (16, 32)]


def test_gradcheck_and_gradgradcheck_float64_no_bias():
    layer = make(in_f=6, out_f=5, r=3, bias=False, alpha=1.5, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    W = layer.weight.detach().clone().requires_grad_()  # W's gradient path too
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def f(x, W, b, A, B):
        return torch.ops.relora.lora_linear(x, W, b, A, B, 1.5)

    assert torch.autograd.gradcheck(f, (x, W, b, A, B))
    assert torch.autograd.gradgradcheck(f, (x, W, b, A, B))
    assert torch.autograd.gradcheck(lambda x, A, B: f(x, W.detach(), None, A, B), (x, A, B))


def test_autocast_bf16_matches_plain_under_autocast():
    layer = make(in_f=64, out_f=32, r=8, alpha=16.0)
    x = torch.randn(3, 10, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_ref = plain_forward(layer, x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    g = torch.randn_like(y)
    for a, b in zip(grads(layer, x, y, g), grads(layer, x, y_ref, g)):
        assert a.dtype == b.dtype  # fp32 grads for the fp32 leaves, as with autocast's own casts
        assert_close(a, b, rtol=3e-2, atol=3e-2)


def test_autocast_leaves_float64_alone():
    layer = make(dtype=torch.float64)
    x = torch.randn(5, 24, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float64
    assert_close(y, plain_forward(layer, x))


def test_bf16_weights():
    layer = make(dtype=torch.bfloat16)
    x = torch.randn(8, 24, dtype=torch.bfloat16, requires_grad=True)
    y, y_ref = layer(x), plain_forward(layer, x)
    assert_close(y, y_ref, rtol=2e-2, atol=2e-2)


def test_compile_fullgraph_matches_eager():
    layer = make(alpha=8.0)
    x = torch.randn(2, 5, 24, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    y, y_ref = compiled(x), layer(x)
    assert_close(y, y_ref)
    g = torch.randn_like(y)
    for a, b in zip(grads(layer, x, y, g), grads(layer, x, y_ref, g)):
        assert_close(a, b)


def test_dropout_in_training_uses_plain_path_and_eval_uses_fused():
    torch.manual_seed(0)
    layer = LoRALinear(16, 16, r=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
    x = torch.randn(32, 16, requires_grad=True)
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    h = F.dropout(x, 0.5, True)
    assert_close(y, F.linear(x, layer.weight, layer.bias) + F.linear(F.linear(h, layer.lora_A), layer.lora_B))
    layer.eval()
    assert_close(layer(x), plain_forward(layer, x))
