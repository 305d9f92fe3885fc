"""The Hugging Face ecosystem (issue 13): ReLoRAConfig and PEFT names, Conv1D and refused bases, merged
save_pretrained, PEFT adapter export loaded by peft, the Trainer callback and cycle hooks."""

import copy
import json

import pytest
import torch
from torch import nn

import relora_ext
from relora_ext import (JaggedCosineLR, ReLoRAConfig, ReLoRAOptimizer, UpdateTracker, lora_layers,
                        print_trainable_parameters, unwrap, wrap)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from _hf_models import IDS, tiny_gpt2, tiny_llama  # noqa: E402


def train(model, opt, steps):
    for _ in range(steps):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()


# -- configuration -----------------------------------------------------------------------------------


def test_config_and_peft_names():
    a = wrap(tiny_llama(), ReLoRAConfig(r=4, lora_alpha=8, lora_dropout=0.1))
    b = wrap(tiny_llama(), r=4, lora_alpha=8, lora_dropout=0.1)
    c = wrap(tiny_llama(), r=4, alpha=8, dropout=0.1)
    d = wrap(tiny_llama(), ReLoRAConfig(r=2), r=4, lora_alpha=8, lora_dropout=0.1)   # keywords override
    for m in (a, b, c, d):
        layers = lora_layers(m)
        assert len(layers) == 14 and all((l.r, l.alpha, l.dropout) == (4, 8.0, 0.1) for _, l in layers)
    with pytest.raises(TypeError, match="alpha= and lora_alpha= both given"):
        wrap(tiny_llama(), r=4, alpha=8, lora_alpha=8)
    with pytest.raises(TypeError, match="config must be a ReLoRAConfig"):
        wrap(tiny_llama(), {"r": 4})
    with pytest.raises(ValueError, match="lora_dropout must be"):
        ReLoRAConfig(lora_dropout=1.0)
    names = lambda m: [n for n, _ in lora_layers(m)]  # noqa: E731
    assert names(wrap(tiny_llama(), r=4, target_modules="all-linear")) == names(wrap(tiny_llama(), r=4))


def test_freeze_others_and_modules_to_save(capsys):
    model = wrap(tiny_llama(), ReLoRAConfig(r=4, freeze_others=True, modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "lora_" in n} | {"lm_head.weight"}
    t, total = print_trainable_parameters(model)
    out = capsys.readouterr().out
    assert out.startswith(f"trainable params: {t:,d} || all params: {total:,d} || trainable%: ")
    assert t == sum(p.numel() for p in model.parameters() if p.requires_grad)
    default = wrap(tiny_llama(), r=4)   # ReLoRA*: everything not adapted trains
    assert all(p.requires_grad for n, p in default.named_parameters() if not n.endswith("proj.weight"))


# -- bases ------------------------------------------------------------------------------------------


def test_gpt2_conv1d_is_adapted_natively_and_unwraps_to_conv1d():
    model, plain = tiny_gpt2(), tiny_gpt2()
    y0 = model(IDS).logits
    wrap(model, r=4)
    layers = lora_layers(model)
    assert len(layers) == 8 and "transformer.h.0.attn.c_attn" in dict(layers)
    torch.testing.assert_close(model(IDS).logits, y0)
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=2)
    train(model, opt, 3)
    y1 = model(IDS).logits
    opt.restart()
    torch.testing.assert_close(model(IDS).logits, y1, rtol=1e-5, atol=1e-5)
    unwrap(model)
    conv = model.transformer.h[0].attn.c_attn
    assert type(conv).__name__ == "Conv1D" and conv.weight.shape == (32, 96)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain(IDS).logits, y1, rtol=1e-5, atol=1e-5)


def test_refused_bases_say_what_to_do():
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="carries PEFT adapters.*needs no wrap.*ReLoRAOptimizer"):
        wrap(peft_model, r=4)
    with pytest.raises(ValueError, match="DataParallel.*bare model first"):
        wrap(nn.DataParallel(nn.Sequential(nn.Linear(4, 4))), r=2)
    model = wrap(tiny_llama(), r=4)
    with pytest.raises(ValueError, match="already wrapped"):
        wrap(model, r=4)
    two = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="cannot adapt layer '1'"):
        wrap(two, r=4, target_modules=["0", "1"])
    assert type(two[0]) is nn.Linear and two[0].weight.requires_grad  # refused as a whole


# -- saving -----------------------------------------------------------------------------------------


def test_save_pretrained_writes_the_merged_model(tmp_path):
    model = wrap(tiny_llama(), r=4)
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=2)
    train(model, opt, 3)          # one cycle done, and an unmerged update since
    y = model(IDS).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    relora_ext.save_pretrained(model, tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(IDS).logits, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base_kind", ["tracker", "model"])
def test_export_peft_adapter_loads_in_peft(tmp_path, base_kind):
    base = tiny_llama()
    model = copy.deepcopy(base)
    wrap(model, ReLoRAConfig(r=2, freeze_others=True))
    tracker = UpdateTracker(model)
    opt = ReLoRAOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2), model,
                          reset_every=3)
    train(model, opt, 9)           # 3 cycles of rank 2: the update reaches rank 6
    y = model(IDS).logits.detach()
    errs = {}
    for k in (1, 2, 6):
        path = tmp_path / f"k{k}"
        per_layer = relora_ext.export_peft_adapter(model, tracker if base_kind == "tracker" else base, path, rank=k)
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == k and len(cfg["target_modules"]) == 14
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
        errs[k] = (float((loaded(IDS).logits - y).abs().max().detach()), max(per_layer.values()))
    assert errs[6][0] < 1e-4 and errs[6][1] < 1e-6       # full rank: the trained model itself
    assert errs[1][0] > errs[2][0] > errs[6][0]            # truncation error falls with the rank
    assert errs[1][1] > errs[2][1] > errs[6][1]


@pytest.mark.parametrize("freeze_others", [False, True])
def test_export_peft_adapter_carries_everything_that_trained(tmp_path, freeze_others):
    base = tiny_llama()
    model = wrap(copy.deepcopy(base), ReLoRAConfig(r=2, freeze_others=freeze_others))
    tracker = UpdateTracker(model)
    opt = ReLoRAOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2), model,
                          reset_every=3)
    train(model, opt, 7)           # 2 cycles and an unmerged update: rank <= 6
    y = model(IDS).logits.detach()
    relora_ext.export_peft_adapter(model, tracker, tmp_path, rank=6)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    others = ["lm_head", "model.embed_tokens", "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
              "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"]
    assert sorted(cfg["modules_to_save"] or []) == ([] if freeze_others else others) and cfg["bias"] == "none"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    rel = float((loaded(IDS).logits.detach() - y).abs().max() / y.abs().max())
    assert rel < 1e-5, rel


def test_export_peft_adapter_biases_and_what_peft_cannot_carry(tmp_path):
    base = tiny_gpt2()
    model = wrap(copy.deepcopy(base), ReLoRAConfig(r=2))     # trains the tied wte/lm_head and every bias
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-2), model, reset_every=3)
    train(model, opt, 4)
    with pytest.raises(ValueError, match=r"'transformer.wte.weight' is shared with \['lm_head.weight'\]"):
        relora_ext.export_peft_adapter(model, base, tmp_path / "tied", rank=8)
    assert not (tmp_path / "tied").exists()
    model.transformer.wte.weight.requires_grad_(False)       # the tie frozen: biases and norms go with the adapter
    with torch.no_grad():
        model.transformer.wte.weight.copy_(base.transformer.wte.weight)
    y = model(IDS).logits.detach()
    relora_ext.export_peft_adapter(model, base, tmp_path / "a", rank=8)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["bias"] == "lora_only" and "transformer.h.0.ln_1" in cfg["modules_to_save"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    assert float((loaded(IDS).logits.detach() - y).abs().max() / y.abs().max()) < 1e-5


@pytest.mark.parametrize("make,targets", [(tiny_llama, None), (tiny_gpt2, None),
                                          (tiny_llama, ["q_proj", "v_proj", "embed_tokens", "lm_head"])])
def test_the_models_own_save_pretrained_writes_the_merged_model(tmp_path, make, targets):
    model = wrap(make(), r=4, target_modules=targets)   # installs the save hook (tiny Llama: head and table untied)
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=2)
    train(model, opt, 3)          # one cycle done, and an unmerged update since
    y = model(IDS).logits.detach()
    model.save_pretrained(tmp_path / "m")
    loaded, info = type(model).from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not any(info.values()), info                     # no missing, unexpected or mismatched keys
    torch.testing.assert_close(loaded.eval()(IDS).logits, y, rtol=1e-5, atol=1e-5)
    torch.save(model, tmp_path / "model.pt")                # the hook pickles, and follows a copy
    for twin in (copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)):
        assert twin.save_pretrained.model is twin
        twin.save_pretrained(tmp_path / "t")
        assert not type(model).from_pretrained(tmp_path / "t", output_loading_info=True)[1]["unexpected_keys"]
    relora_ext.unwrap(model)                                # the plain model again: the class's own method
    assert "save_pretrained" not in model.__dict__


# -- training loop integration ----------------------------------------------------------------------------


def test_cycle_hook_and_schedule_defaults():
    model = wrap(tiny_llama(), r=4)
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=2)
    seen = []
    handle = opt.register_cycle_hook(lambda o, info: seen.append(info))
    sched = JaggedCosineLR(opt, total_steps=10, warmup_steps=1, restart_warmup_steps=1)
    assert sched.cycle_length == 2
    train(model, opt, 4)
    assert [i["cycle"] for i in seen] == [0, 1] and [i["step"] for i in seen] == [2, 4]
    handle.remove()
    train(model, opt, 2)
    assert len(seen) == 2
    with pytest.warns(UserWarning, match="no reset happens"):
        JaggedCosineLR(opt, total_steps=2, warmup_steps=1, restart_warmup_steps=1)
    with pytest.raises(ValueError, match="cycle_length is needed"):
        JaggedCosineLR(torch.optim.SGD(model.parameters(), lr=1.0), total_steps=10, warmup_steps=1,
                       restart_warmup_steps=1)


def test_trainer_callback_logs_cycles(tmp_path, capsys):
    model = wrap(tiny_llama(), r=4)
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=2)
    sched = JaggedCosineLR(opt, total_steps=6, warmup_steps=1, restart_warmup_steps=1)
    data = [{"input_ids": IDS[0], "labels": IDS[0]} for _ in range(12)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2,
                                          logging_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched),
                                   callbacks=[relora_ext.ReLoRACallback(opt, tracker=None)])
    trainer.train()
    cycles = [e for e in trainer.state.log_history if "relora/cycle" in e]
    assert [e["relora/cycle"] for e in cycles] == [0, 1, 2] and opt.cycles_done == 3
    out = capsys.readouterr().out       # on the console too, where the Trainer prints its own log lines
    assert [line[:19] for line in out.splitlines() if "relora/cycle'" in line] == [
        f"{{'relora/cycle': {c}," for c in range(3)]
    assert all(e["relora/kept"] > 0 for e in cycles)
    logged = [e["relora/cycles_done"] for e in trainer.state.log_history if "relora/cycles_done" in e]
    assert logged[-1] == 3 and logged == sorted(logged)
    with pytest.warns(UserWarning, match="no cycle will run"):
        cb = relora_ext.ReLoRACallback(opt)
        cb.on_train_begin(args, type("S", (), {"max_steps": 1})(), None)


def test_adapters_only_save_and_load(tmp_path):
    model = wrap(tiny_llama(), r=4)
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, reset_every=100)
    train(model, opt, 2)
    relora_ext.save_adapters(model, tmp_path / "a.safetensors")
    other = wrap(tiny_llama(), r=4)
    relora_ext.load_adapters(other, tmp_path / "a.safetensors")
    for (_, a), (_, b) in zip(lora_layers(model), lora_layers(other)):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
    wrong = wrap(tiny_llama(), r=4, lora_alpha=8)
    before = [l.lora_A.clone() for _, l in lora_layers(wrong)]
    with pytest.raises(ValueError, match="alpha=4.0 but the model has alpha=8.0"):
        relora_ext.load_adapters(wrong, tmp_path / "a.safetensors")
    assert all(torch.equal(b, l.lora_A) for b, (_, l) in zip(before, lora_layers(wrong)))


def test_wrap_weight_dtype_and_unwrap_restores_the_dtype():
    model = wrap(tiny_llama(), r=4, weight_dtype=torch.bfloat16)
    layers = lora_layers(model)
    assert all(l.weight.dtype == torch.bfloat16 and l.lora_A.dtype == torch.float32 for _, l in layers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(IDS, labels=IDS).loss.backward()
    unwrap(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
