"""memory_report: exact byte counts, worked out by hand for a small model."""

import pytest
import torch
from torch import nn

import relora_ext
from relora_ext import LoRALinear, ReLoRAOptimizer, SSTLinear
from relora_ext.embedding import LoRAEmbedding
from relora_ext.memory import GROUPS, memory_report


class Small(nn.Module):
    """embed (10, 4): 40; proj (4, 4) + bias: 16 + 4; norm (LayerNorm 4): 4 + 4; lm_head (10, 4): 40;
    one float32 buffer of 3 elements. 111 elements, all float32."""

    def __init__(self, tied=False):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("table", torch.zeros(3))

    def forward(self, ids):
        return self.lm_head(self.norm(self.proj(self.embed(ids))))


def figures(report, key):
    g = report.groups[key]
    return g.params, g.param_bytes, g.grad_bytes, g.state_bytes


def step(model, opt):
    model(torch.tensor([[1, 2, 3]])).square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_full_rank_estimated_as_adamw_without_optimizer():
    rep = memory_report(Small())
    # AdamW estimate: exp_avg + exp_avg_sq (2 x 4 bytes per element) + a 4-byte step per parameter
    assert figures(rep, "embeddings_head") == (80, 320, 320, 2 * 320 + 2 * 4)   # embed.weight, lm_head.weight
    assert figures(rep, "full_rank") == (16, 64, 64, 128 + 4)                  # proj.weight
    assert figures(rep, "norms") == (8, 32, 32, 64 + 2 * 4)                    # norm.weight, norm.bias
    assert figures(rep, "other") == (4, 16, 16, 32 + 4)                        # proj.bias
    assert figures(rep, "buffers") == (3, 12, 0, 0)
    assert figures(rep, "adapters") == figures(rep, "frozen") == (0, 0, 0, 0)
    t = rep.total
    assert (t.params, t.param_bytes, t.grad_bytes, t.state_bytes) == (111, 444, 432, 648 + 132 + 72 + 36)
    assert rep.trainable == 108 and rep.state == "estimated" and "no optimizer given" in rep.state_note
    assert rep.full_rank == {"Embedding": 1, "Linear": 2} and rep.adapted == {}


def test_tied_parameters_counted_once():
    rep = memory_report(Small(tied=True))
    assert figures(rep, "embeddings_head") == (40, 160, 160, 2 * 160 + 4)
    assert rep.total.params == 71 and rep.total.param_bytes == 284


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_estimate_matches_adamw_state_after_a_step(amsgrad, dtype):
    model = Small().to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=amsgrad)
    before = memory_report(model, opt)
    assert before.state == "estimated" and "AdamW" in before.state_note
    step(model, opt)
    after = memory_report(model, opt)
    assert after.state == "measured"
    for key in GROUPS:
        assert figures(before, key) == figures(after, key), key
    n = 3 if amsgrad else 2
    assert after.total.state_bytes == n * 108 * dtype.itemsize + 6 * 4 == relora_ext.optimizer_state_bytes(opt)
    assert after.total.grad_bytes == 108 * dtype.itemsize


def test_adapted_model_through_relora_optimizer():
    model = Small()
    model.proj = LoRALinear.from_linear(model.proj, r=2, weight_dtype=torch.bfloat16)
    model.lm_head = LoRALinear.from_linear(model.lm_head, r=2, weight_dtype=torch.bfloat16)
    model.embed = LoRAEmbedding.from_embedding(model.embed, r=2)
    opt = ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, reset_every=5)
    step(model, opt)
    rep = memory_report(model, opt)
    # adapters: embed A (2, 10) + B (4, 2) = 28; proj A (2, 4) + B (4, 2) = 16; lm_head A (2, 4) + B (10, 2) = 28
    # AdamW state measured: 2 x 72 x 4 bytes + a 4-byte step for each of the 6 factors
    assert figures(rep, "adapters") == (72, 288, 288, 2 * 288 + 6 * 4)
    # frozen: the fp32 table (40 x 4 bytes), proj.weight and lm_head.weight in bf16 (16 x 2, 40 x 2)
    assert figures(rep, "frozen") == (96, 160 + 32 + 80, 0, 0)
    assert figures(rep, "other") == (4, 16, 16, 32 + 4)  # proj.bias stays trainable
    assert figures(rep, "embeddings_head") == (0, 0, 0, 0)
    assert rep.adapted == {"LoRAEmbedding": 1, "LoRALinear": 2} and rep.full_rank == {}
    assert rep.state == "measured" and rep.optimizer_name == "ReLoRAOptimizer(AdamW)"


def test_sst_blocks_are_adapters_and_u_v_are_buffers():
    model = nn.Sequential(SSTLinear.from_linear(nn.Linear(4, 4), r=2))
    rep = memory_report(model)
    # sigma (4,) + U_active (4, 2) + V_active (4, 2); buffers U, V (4, 4) fp32 and active (2,) int64
    assert figures(rep, "adapters") == (20, 80, 80, 2 * 80 + 3 * 4)
    assert figures(rep, "buffers") == (34, 128 + 16, 0, 0)
    assert figures(rep, "other") == (4, 16, 16, 36)


def test_mixed_unknown_and_not_held():
    model = Small()
    opt = torch.optim.AdamW([model.embed.weight, model.proj.weight], lr=1e-3)
    step(model, opt)
    opt.add_param_group({"params": [model.proj.bias]})  # held, no state yet
    rep = memory_report(model, opt)
    assert rep.state == "measured and estimated"
    assert figures(rep, "other") == (4, 16, 16, 36)
    # lm_head.weight (40) and the norm (8) are trainable but not held: gradients, no state
    assert figures(rep, "embeddings_head") == (80, 320, 320, 2 * 160 + 4)
    assert rep.notes and "48 trainable parameter elements are not held" in rep.notes[0]
    rms = memory_report(model, torch.optim.RMSprop(model.parameters()))
    assert rms.total.state_bytes == 0 and "unknown before its first step" in rms.state_note
    sgd = memory_report(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert sgd.total.state_bytes == 432


def test_frozen_parameters_take_no_grad_or_state():
    model = Small()
    model.embed.weight.requires_grad_(False)
    rep = memory_report(model)
    assert figures(rep, "frozen") == (40, 160, 0, 0)
    assert figures(rep, "embeddings_head") == (40, 160, 160, 324)


def test_str_and_refusals(capsys):
    rep = memory_report(Small())
    text = str(rep)
    assert text.startswith("memory report: Small, no optimizer given")
    assert GROUPS["embeddings_head"] in text and "optimizer state estimated" in text
    assert "adapters (" not in text  # empty groups are left out
    assert rep.to_dict()["groups"]["norms"]["params"] == 8
    with pytest.raises(TypeError, match="memory_report: model must be an nn.Module, got int"):
        memory_report(3)
    with pytest.raises(TypeError, match="optimizer must be None or a torch.optim.Optimizer, got list"):
        memory_report(Small(), [])


def test_a_peft_models_factors_count_as_adapters():
    pytest.importorskip("peft")
    from _hf_models import tiny_peft_llama

    report = relora_ext.memory_report(tiny_peft_llama())  # 2 blocks, q_proj and v_proj adapted at r = 2
    assert report.adapted == {"PEFT Linear": 4}
    assert report.groups["adapters"].params == 4 * (2 * 32 + 32 * 2)  # A (2, 32) and B (32, 2) per layer
    assert report.groups["full_rank"].params == 0
