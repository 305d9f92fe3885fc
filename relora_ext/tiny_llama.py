"""A small LLaMA-style decoder for demos and tests: RMSNorm, rotary embeddings, SwiGLU MLP, causal
attention through :func:`torch.nn.functional.scaled_dot_product_attention`.

Module names follow Hugging Face's ``LlamaForCausalLM`` (``embed_tokens``, ``layers.i.self_attn.q_proj``,
``mlp.gate_proj``, ``lm_head``...), so :func:`relora_ext.wrap`'s default selection adapts every projection
and leaves the embeddings and the head full-rank.

Example::

    >>> model = TinyLlama(TinyLlamaConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4))
    >>> logits = model(torch.randint(0, 256, (2, 64)))      # (2, 64, 256)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyLlamaConfig", "TinyLlama"]


@dataclass
class TinyLlamaConfig:
    """Sizes of :class:`TinyLlama`. ``hidden_dim`` defaults to ``8/3 · dim`` rounded up to a multiple of 16."""

    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    hidden_dim: int = 0
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"TinyLlamaConfig: dim ({self.dim}) must be a multiple of 2 * n_heads ({self.n_heads})")
        if not self.hidden_dim:
            self.hidden_dim = -(-(8 * self.dim // 3) // 16) * 16


def _rope_tables(head_dim: int, max_seq_len: int, theta: float):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv)  # (T, hd/2)
    return ang.cos().float(), ang.sin().float()


def _apply_rope(x, cos, sin):
    """x (B, H, T, hd): rotate the pairs (x[..., :hd/2], x[..., hd/2:]) by the position's angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):  # x (B, T, C)
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """LLaMA-style causal language model. Input ids ``(B, T)`` (``T <= max_seq_len``) -> logits ``(B, T, V)``."""

    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = _rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=cfg.init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"TinyLlama: sequence length must be <= max_seq_len={self.cfg.max_seq_len}, got {T}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head
