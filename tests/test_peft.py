"""ReLoRA* on PEFT's own LoRA layers (issue 21): the views of relora_ext.peft_layers cycled by the cycle
(merge into PEFT's base weight, Philox re-draw of A, B zeroed, state pruned), checked against the same
work done with plain torch; what a merge would get wrong is refused, naming the option and the layer."""

import copy
import math

import pytest
import torch
from torch import nn

import relora_ext
from relora_ext import CycleRefused, ReLoRAOptimizer, ops
from relora_ext.cycle import CycleSettings, LocalLayer, reset_offset, run_cycle
from relora_ext.peft_layers import PeftLoRAView, lora_views

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from _hf_models import IDS, tiny_gpt2, tiny_llama  # noqa: E402


def peft_llama(**kw):
    kw.setdefault("target_modules", "all-linear")
    return peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, **kw))


def cycle(model, opt, c, settings):
    views = lora_views(model)
    return run_cycle(views, [LocalLayer] * len(views), opt.state, settings, c)


# -- the plain-torch reference -----------------------------------------------------------------------------


def reference_prune_(t, ratio):
    """Keep the n - floor(ratio n) largest |t|, ties to the lower flat index (a stable descending sort)."""
    flat = t.view(-1)
    keep = flat.numel() - math.floor(ratio * flat.numel())
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:keep]] = True
    flat.masked_fill_(~mask, 0)


@torch.no_grad()
def reference_cycle(model, opt, c, ratio):
    """The ReLoRA* cycle on PEFT's tensors in plain torch: W += s·B·A (float64 sum, one rounding), A re-drawn
    (the Philox draw of layer ℓ at cycle c, taken from ops.reset_ on a scratch copy), B = 0, Adam state of A
    and B magnitude-pruned, exp_avg zeroed where exp_avg_sq was."""
    lora = [m for m in model.modules() if isinstance(m, peft.tuners.lora.Linear)]
    for li, m in enumerate(lora):
        A, B, W = m.lora_A["default"].weight, m.lora_B["default"].weight, m.base_layer.weight
        W.copy_((W.double() + m.scaling["default"] * (B.double() @ A.double())).to(W.dtype))
        drawn, zeroed = torch.empty_like(A), torch.empty_like(B)
        ops.reset_(drawn, zeroed, std=1 / math.sqrt(3 * A.shape[1]), seed=0, offset=reset_offset(li, c))
        A.copy_(drawn)
        B.zero_()
        for p in (A, B):
            st = opt.state[p]
            for k in ("exp_avg", "exp_avg_sq"):
                reference_prune_(st[k], ratio)
            st["exp_avg"].masked_fill_(st["exp_avg_sq"] == 0, 0)


def test_three_cycles_equal_a_plain_torch_reference():
    model = peft_llama()
    ref = copy.deepcopy(model)
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=3)   # the one line
    opts = [opt, torch.optim.AdamW(ref.parameters(), lr=1e-2)]
    kept = []
    opt.register_cycle_hook(lambda o, info: kept.append((info["kept"], info["total"])))
    for c in range(3):
        for m, o in zip((model, ref), opts):
            for _ in range(3):
                m(IDS, labels=IDS).loss.backward()
                o.step()      # the third step of the ReLoRAOptimizer ends with the cycle
                o.zero_grad()
        reference_cycle(ref, opts[1], c, opt.prune_ratio)
        assert opt.cycles_done == c + 1 and 0 < kept[-1][0] < kept[-1][1]
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
        if "lora_B" in n:
            assert not p.any()           # zeroed by the last cycle
    for p, q in zip(model.parameters(), ref.parameters()):
        for k, v in opts[0].state[p].items():
            torch.testing.assert_close(v, opts[1].state[q][k], rtol=1e-5, atol=1e-7)
    assert all(float(t.detach().std()) > 0 for n, t in model.named_parameters() if "lora_A" in n)


def test_views_are_peft_tensors_and_stay_out_of_the_model():
    model = peft_llama()
    keys = list(model.state_dict())
    views = lora_views(model)
    assert len(views) == 14 and views == lora_views(model)        # one view per layer, kept
    assert [n for n, _ in views] == [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.Linear)]
    name, v = views[0]
    layer = model.get_submodule(name)
    assert v.lora_A is layer.lora_A["default"].weight and v.lora_B is layer.lora_B["default"].weight
    assert v.weight is layer.base_layer.weight and v.scaling == 2.0 and v.cycled == ("lora_A", "lora_B")
    assert v.init_std == pytest.approx(float(1 / math.sqrt(3 * 32)))
    assert list(model.state_dict()) == keys and not any(isinstance(m, PeftLoRAView) for m in model.modules())
    twin = copy.deepcopy(model)                                    # a copy's views point at the copy
    assert lora_views(twin)[0][1].lora_A is twin.get_submodule(name).lora_A["default"].weight


def test_gpt2_conv1d_fan_in_fan_out_merges_into_the_transposed_weight():
    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"],
                                                             fan_in_fan_out=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    layer = model.get_submodule(lora_views(model)[0][0])
    expect = layer.base_layer.weight.detach() + layer.get_delta_weight("default")   # PEFT's own merge, (in, out)
    y = model(IDS).logits.detach()
    cycle(model, opt, 0, CycleSettings(reset_every=2))
    torch.testing.assert_close(layer.base_layer.weight, expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(IDS).logits, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_bitsandbytes_base_is_requantized(kind):
    bnb = pytest.importorskip("bitsandbytes")
    from relora_ext.quantized import dequantize, requantize_
    from test_quantized import quantized

    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(quantized(kind, nn.Linear(64, 48)), nn.Tanh(), nn.Linear(48, 8)),
                                peft.LoraConfig(r=4, target_modules=["0"]))
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    (name, v), = lora_views(model)
    base = v.base_layer
    probe = quantized(kind, nn.Linear(64, 48))
    requantize_(probe, dequantize(base) + v.scaling * v.lora_B.detach() @ v.lora_A.detach())
    cycle(model, opt, 0, CycleSettings(reset_every=3))
    assert torch.equal(dequantize(base), dequantize(probe)) and not v.lora_B.any()
    assert v.check() is None
    unready = nn.Sequential(nn.Linear(64, 48))                     # a bnb layer whose weight is not quantized yet
    unready[0] = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False) if kind == "8bit" else \
        bnb.nn.Linear4bit(64, 48, compute_dtype=torch.float32)
    (_, u), = lora_views(peft.get_peft_model(unready, peft.LoraConfig(r=4, target_modules=["0"])))
    assert "not quantized yet" in u.check()


# -- refusals ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, match", [
    (lambda: peft_llama(use_dora=True), "use_dora=True"),
    (lambda: peft_llama(lora_bias=True), "lora_bias=True"),
    (lambda: peft_llama(target_modules=["embed_tokens", "q_proj"]), "model.embed_tokens.*Embedding.*target_modules"),
])
def test_what_a_merge_gets_wrong_is_refused_naming_the_option(build, match):
    model = build()
    with pytest.raises(ValueError, match=match):
        lora_views(model)
    with pytest.raises(ValueError, match=match):     # the optimizer of a PEFT model lists the same views
        ReLoRAOptimizer(torch.optim.AdamW(model.parameters()), model, reset_every=3)


def test_several_active_adapters_or_a_merged_adapter_are_refused():
    model = peft_llama(target_modules=["q_proj"])
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"several adapters are active \(\['default', 'other'\]\).*set_adapter"):
        lora_views(model)
    model.base_model.set_adapter("other")
    assert [v.adapter for _, v in lora_views(model)] == ["other", "other"]
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weight.*unmerge_adapter"):
        lora_views(model)


def test_a_refused_cycle_changes_nothing():
    model = peft_llama(target_modules=["q_proj", "v_proj"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    views = lora_views(model)
    views[-1][1].lora_B.data[0, 0] = float("nan")
    with model.disable_adapter():                                   # PEFT's state is read at every check
        assert "disabled" in views[0][1].check()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters() if p in opt.state]
    with pytest.raises(CycleRefused, match=f"{views[-1][0]}.*lora_B holds non-finite"):
        cycle(model, opt, 0, CycleSettings(reset_every=1))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) or (v.isnan() == before[k].isnan()).all()
    for st, p in zip(state, [p for p in model.parameters() if p in opt.state]):
        assert all(torch.equal(v, opt.state[p][k]) for k, v in st.items())


def test_peft_adapter_only_save_is_refused_and_a_checkpoint_resumes_exactly(tmp_path):
    import relora_ext

    def build():
        model = peft_llama(target_modules=["q_proj", "up_proj"])
        return model, ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=2)

    model, opt = build()
    for _ in range(3):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    with pytest.raises(ValueError, match="adapter file holds only the current lora_A/lora_B.*merge_and_unload"):
        model.save_pretrained(tmp_path / "adapter")           # would drop the cycle merged into the base
    assert not (tmp_path / "adapter").exists()
    torch.save(model, tmp_path / "model.pt")                 # the refusal pickles with the model
    with pytest.raises(ValueError, match="cycled by ReLoRA"):
        torch.load(tmp_path / "model.pt", weights_only=False).save_pretrained(tmp_path / "adapter")
    relora_ext.save_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=opt)
    twin, twin_opt = build()
    relora_ext.load_checkpoint(tmp_path / "ckpt.pt", model=twin, optimizer=twin_opt)
    for m, o in ((model, opt), (twin, twin_opt)):
        for _ in range(3):
            m(IDS, labels=IDS).loss.backward()
            o.step()
            o.zero_grad()
    assert opt.cycles_done == twin_opt.cycles_done == 3
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    y = model(IDS).logits.detach()
    with pytest.raises(ValueError, match="is a PEFT model, cycled as it is.*merge_and_unload"):
        relora_ext.export_peft_adapter(model, {}, tmp_path / "export", rank=4)
    model.merge_and_unload().save_pretrained(tmp_path / "merged")   # the road the refusals name
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(loaded(IDS).logits, y, rtol=1e-5, atol=1e-5)


def test_a_tied_head_adapted_by_peft_is_refused():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=64, tie_word_embeddings=True)
    base = transformers.LlamaForCausalLM(cfg)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"PEFT layer '.*lm_head': its base weight shares memory with .*embed_tokens"):
        ReLoRAOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, reset_every=1)


def test_trainer_checkpoints_of_a_cycled_peft_model_are_refused_before_training(tmp_path):
    model = peft_llama()
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, save_steps=3, report_to=[],
                                          per_device_train_batch_size=2, use_cpu=True)
    data = [{"input_ids": IDS[i], "labels": IDS[i]} for i in range(2)]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                                   callbacks=[relora_ext.ReLoRACallback(opt)])
    with pytest.raises(ValueError, match="save_strategy='no'"):
        trainer.train()
    assert opt.steps_taken == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
