"""Tiny transformers models the Hugging Face and PEFT tests share (import after pytest.importorskip)."""

import torch
import transformers

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=64, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_peft_llama(seed=0, target_modules=("q_proj", "v_proj")):
    """:func:`tiny_llama` with PEFT LoRA adapters (r = 2) on ``target_modules``."""
    import peft

    return peft.get_peft_model(tiny_llama(seed), peft.LoraConfig(r=2, target_modules=list(target_modules)))


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()
