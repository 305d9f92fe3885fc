"""ReLoRA* on bitsandbytes 4-bit and 8-bit frozen weights: wrap, train, cycle (dequantize, merge in float32,
requantize), unwrap, and the requantization error."""

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from relora_ext import ReLoRAOptimizer, lora_layers, unwrap, wrap  # noqa: E402
from relora_ext.quantized import QuantizedLoRALinear, dequantize, requantization_error, requantize_  # noqa: E402


def quantized(kind, lin):
    if kind == "4bit":
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    q.bias = nn.Parameter(lin.bias.data.clone())
    return q.to("cpu")


def model_for(kind, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(quantized(kind, nn.Linear(64, 48)), nn.Tanh(), nn.Linear(48, 8))


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_wrap_train_cycle_unwrap(kind):
    model = model_for(kind)
    base_type = type(model[0])
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    y0 = model(x)
    wrap(model, r=4, target_modules=["0", "2"])
    assert isinstance(model[0], QuantizedLoRALinear) and len(lora_layers(model)) == 2
    torch.testing.assert_close(model(x), y0)                      # B = 0: an exact no-op
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-2), model, reset_every=100)
    for _ in range(5):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    layer = model[0]
    W_old = dequantize(layer.base)
    delta = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    probe = quantized(kind, nn.Linear(64, 48))
    requantize_(probe, W_old + delta)                             # the reference: requantize W + s·B·A
    opt.restart()
    assert bool((layer.lora_B == 0).all()) and opt.cycles_done == 1
    assert torch.equal(dequantize(layer.base), dequantize(probe))
    probe.bias = layer.base.bias
    torch.testing.assert_close(layer.base(x), probe(x))           # the layer computes with the new codes
    unwrap(model)
    assert type(model[0]) is base_type


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_requantization_error_falls_as_the_update_grows(kind):
    model = model_for(kind)
    g = torch.Generator().manual_seed(2)
    direction = torch.randn(48, 4, generator=g) @ torch.randn(4, 64, generator=g)
    W = dequantize(model[0])
    errors = []
    for rel in (1e-3, 1e-1):
        delta = direction * (rel * torch.linalg.matrix_norm(W) / torch.linalg.matrix_norm(direction))
        errors.append(requantization_error(model[0], delta))
    assert errors[0] > errors[1]
    assert torch.equal(dequantize(model[0]), W)                   # measuring changes nothing
