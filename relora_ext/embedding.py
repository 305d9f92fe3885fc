"""ReLoRA* for token embeddings: :class:`LoRAEmbedding`, a drop-in :class:`torch.nn.Embedding`.

The table ``E (vocab, d)`` is frozen; its update is ``ΔE = s · Aᵀ Bᵀ`` with ``A (r, vocab)`` looked up by
token like ``E`` and ``B (d, r)`` dense, as PEFT's embedding adapter keeps them::

    out[t] = E[t] + s · B · A[:, t],        s = alpha / r

``A`` starts at zero and ``B`` random (a random looked-up factor would give every unseen token a random
offset, and only the columns of the tokens in a batch get a gradient). A ReLoRA* cycle merges
``E += s · (B·A)ᵀ`` (:func:`relora_ext.ops.merge_` on ``E.t()``), re-draws ``B`` and zeroes ``A``; the
network's function is unchanged up to one rounding of ``E``.

Example::

    >>> emb = torch.nn.Embedding(1000, 64)
    >>> lora = LoRAEmbedding.from_embedding(emb, r=8)
    >>> lora.weight is emb.weight, lora(torch.tensor([[1, 2, 3]])).shape
    (True, torch.Size([1, 3, 64]))
    >>> lora.merge_and_reset_(seed=0, offset=0)          # E += s·(B·A)ᵀ; A = 0; B redrawn
    >>> plain = lora.to_base()                           # an nn.Embedding holding the merged table
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import FLOAT_DTYPES, check_int, check_rank, is_dtensor
from .adapter import LowRankAdapter

__all__ = ["LoRAEmbedding"]


def refuse_embedding_options(where: str, emb: nn.Embedding) -> None:
    """Refuse an ``emb`` using nn.Embedding options whose meaning does not carry over to a frozen table plus a
    low-rank update (:func:`relora_ext.wrap` asks before it changes anything)."""
    _refuse_options(where, emb.max_norm, emb.scale_grad_by_freq, emb.sparse)


def _refuse_options(where: str, max_norm, scale_grad_by_freq, sparse) -> None:
    """nn.Embedding options whose meaning does not carry over to a frozen table plus a low-rank update."""
    if max_norm is not None:
        raise ValueError(f"{where}: max_norm must be None, got {max_norm!r}: max_norm rewrites the looked-up rows "
                         "of the table in place at every forward, and the table is frozen (its update lives in the "
                         "factors); renormalise the embeddings yourself or leave this layer full rank")
    if scale_grad_by_freq is not False:
        raise ValueError(f"{where}: scale_grad_by_freq must be False, got {scale_grad_by_freq!r}: it scales the "
                         "gradient of the table's rows, which are frozen here (the dense factor B has no rows per "
                         "token to scale); leave this layer full rank to keep it")
    if sparse is not False:
        raise ValueError(f"{where}: sparse must be False, got {sparse!r}: the table is frozen and the factors take "
                         "dense gradients (zero outside the looked-up columns of lora_A), which every optimizer accepts")


class LoRAEmbedding(LowRankAdapter):
    r"""A drop-in :class:`torch.nn.Embedding` with a frozen table and a trainable low-rank update.

    Computes ``out[..., :] = E[t] + s · B · A[:, t]`` for each token id ``t`` of the input, ``s = alpha / r``.

    Shapes: input ``(*)`` of int64/int32 token ids in ``[0, num_embeddings)``; output ``(*, embedding_dim)``
    in the factors' dtype (the layer's dtype; a table kept in another ``weight_dtype`` is cast row by row).
    Parameters:

    - ``weight`` ``(num_embeddings, embedding_dim)``: frozen; ``N(0, 1)`` like :class:`torch.nn.Embedding`
      when built from scratch (the ``padding_idx`` row zero);
    - ``lora_A`` ``(r, num_embeddings)``: trainable, looked up by token; zero at init and after every reset.
      Its gradient is zero outside the columns of the tokens in the batch;
    - ``lora_B`` ``(embedding_dim, r)``: trainable, dense, ``N(0, init_std²)`` at init and at every reset.

    Args:
        num_embeddings, embedding_dim, padding_idx, device, dtype: as for :class:`torch.nn.Embedding`.
            ``padding_idx`` (negative counts from the end) keeps its meaning: the column ``A[:, padding_idx]``
            gets no gradient, so it stays zero and the padding row of ``E`` never changes, merges included.
        max_norm, scale_grad_by_freq, sparse: refused unless left at their defaults (``None``, ``False``,
            ``False``): ``max_norm`` rewrites rows of the (frozen) table, the other two act on the table's
            gradient, which a frozen table does not have.
        r: rank of the update, ``1 <= r <= min(num_embeddings, embedding_dim)``.
        alpha: scale numerator, ``s = alpha / r``; default ``alpha = r`` (``s = 1``), as for
            :class:`~relora_ext.LoRALinear`.
        init_std: standard deviation of ``B`` at init and at every reset. **Default ``1 / sqrt(r)``**: ``B`` maps
            the looked-up ``r``-vector ``A[:, t]`` to ``d`` outputs, a fan-in of ``r`` (the rule
            :class:`~relora_ext.LoRALinear` applies to ``A``). With Adam, which moves each entry of ``A`` by about
            the learning rate per step, a row ``E[t] + s·B·A[:, t]`` then moves by about ``s·lr`` per entry, as a
            full-rank table trained by Adam does.
        weight_dtype: the dtype the frozen table is stored in between merges (``None``: the layer's dtype);
            see :class:`~relora_ext.LoRALinear`.

    Example::

        >>> layer = LoRAEmbedding(1000, 64, r=8, padding_idx=0)
        >>> out = layer(torch.randint(0, 1000, (4, 16)))          # (4, 16, 64)
        >>> [n for n, p in layer.named_parameters() if p.requires_grad]
        ['lora_A', 'lora_B']
    """

    __constants__ = ["num_embeddings", "embedding_dim", "padding_idx", "r"]
    shape_fields = ("num_embeddings", "embedding_dim")

    num_embeddings: int
    embedding_dim: int
    padding_idx: Optional[int]

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, device=None, dtype=None, *, r: int, alpha: Optional[float] = None,
                 init_std: Optional[float] = None, weight_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        where = "LoRAEmbedding"
        _refuse_options(where, max_norm, scale_grad_by_freq, sparse)
        check_int(where, "num_embeddings", num_embeddings, lo=1)
        check_int(where, "embedding_dim", embedding_dim, lo=1)
        base = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype)
        self._adopt(base, r=r, alpha=alpha, init_std=init_std, weight_dtype=weight_dtype, where=where)
        self._weight_requires_grad = True

    # -- construction ------------------------------------------------------------------------------

    def _adopt(self, emb: nn.Embedding, *, r, alpha, init_std, weight_dtype, where: str) -> None:
        weight = emb.weight
        if not weight.dtype.is_floating_point:
            raise TypeError(f"{where}: the table must be floating point, got {weight.dtype}")
        if weight_dtype is not None and weight_dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where}: weight_dtype must be None or one of "
                            f"{', '.join(str(d) for d in FLOAT_DTYPES)}, got {weight_dtype!r}")
        self.num_embeddings, self.embedding_dim = (int(n) for n in weight.shape)
        self.padding_idx = emb.padding_idx  # nn.Embedding has made it non-negative
        self.r = check_rank(where, r, self.num_embeddings, self.embedding_dim)
        factory = {"device": weight.device, "dtype": weight.dtype}  # A and B: the layer's dtype
        self.alpha = float(self.r) if alpha is None else alpha
        init_std = self.valid_init_std(where, 1.0 / math.sqrt(self.r) if init_std is None else init_std,
                                       weight.dtype)  # checked before the table is touched
        self.freeze_(weight, weight_dtype)
        self.weight = weight
        self.lora_A = nn.Parameter(torch.zeros(self.r, self.num_embeddings, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.embedding_dim, self.r, **factory))
        self.init_std = init_std
        self.reset_lora_parameters()
        self.train(emb.training)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, *, r: int, alpha: Optional[float] = None,
                       init_std: Optional[float] = None,
                       weight_dtype: Optional[torch.dtype] = None) -> "LoRAEmbedding":
        """Build a :class:`LoRAEmbedding` that adopts ``emb.weight`` (no copy: ``result.weight is emb.weight``,
        now frozen; with ``weight_dtype`` its data is converted, the Parameter kept). The factors are created
        on the table's device in its dtype. Refuses an ``emb`` using ``max_norm``, ``scale_grad_by_freq`` or
        ``sparse`` (see the class). A table tied to an output head must not be adapted here: a merge would
        change the head too.

        Example::

            >>> emb = torch.nn.Embedding(32000, 768)
            >>> lora = LoRAEmbedding.from_embedding(emb, r=128, weight_dtype=torch.bfloat16)
        """
        where = "LoRAEmbedding.from_embedding"
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"{where}: emb must be an nn.Embedding, got {type(emb).__name__}")
        refuse_embedding_options(where, emb)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        requires_grad = emb.weight.requires_grad
        self._adopt(emb, r=r, alpha=alpha, init_std=init_std, weight_dtype=weight_dtype, where=where)
        self._weight_requires_grad = requires_grad
        return self

    def reset_lora_parameters(self) -> None:
        """Re-initialise the adapter with torch's global generator: ``A = 0``, ``B ~ N(0, init_std²)``
        (the cycle's resets use the counter-based draw of :meth:`merge_and_reset_`)."""
        with torch.no_grad():
            self.lora_A.zero_()
            nn.init.normal_(self.lora_B, mean=0.0, std=self.init_std)

    # -- forward -------------------------------------------------------------------------------------

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``input`` ``(*)`` token ids -> ``(*, embedding_dim)``: ``E[t] + s · (A[:, t]ᵀ Bᵀ)``.

        The columns of ``A`` are gathered with ``index_select`` on dimension 1 (its backward adds into the
        looked-up columns only; a lookup in the strided view ``A.t()`` measured 2x slower: RESULTS.md,
        bench_memory_lookup), then one
        ``(N, r) @ (r, d)`` product is added to the looked-up rows of ``E``.
        """
        ids = input.reshape(-1)
        rows = F.embedding(ids, self.weight).to(self.lora_A.dtype)      # (N, d); the table is frozen
        a = self.lora_A.index_select(1, ids)                             # (r, N)
        if self.padding_idx is not None:  # no gradient into the padding column, so it stays zero
            a = a.masked_fill(ids == self.padding_idx, 0.0)
        out = torch.add(rows, a.t() @ self.lora_B.t(), alpha=self.scaling)  # the product may be autocast's dtype
        return out.view(*input.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s + f", r={self.r}, alpha={self.alpha}"

    # -- ReLoRA* ------------------------------------------------------------------------------------

    def merge_operands(self, weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(E.t(), A, B)``: ``E.t()`` is ``(d, vocab)``, ``A (r, vocab)``, ``B (d, r)``, so the merge
        ``E.t() += s · B @ A`` is ``E += s · (B·A)ᵀ`` (:func:`relora_ext.ops.merge_` takes the transposed view)."""
        return (self.weight if weight is None else weight).t(), self.lora_A, self.lora_B

    def base_state_dict(self):
        """The merged table, in the factors' dtype as :meth:`to_base` gives it."""
        self.refuse_if_unfit("merged_state_dict")
        return {"weight": self.merged_weight().to(self.lora_A.dtype)}

    def reset_operands(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(lora_B, lora_A)``: ``B`` is re-drawn, the looked-up ``A`` zeroed."""
        return self.lora_B, self.lora_A

    def check(self) -> Optional[str]:
        """:meth:`LowRankAdapter.check`, and the factors' shapes against ``r`` and the table."""
        if any(is_dtensor(t) for t in (self.weight, self.lora_A, self.lora_B)):
            # FSDP2 shards the table by vocabulary rows, the merge's columns: the row-wise sharded merge of
            # linear layers does not apply
            return "a sharded (FSDP2 DTensor) LoRAEmbedding is not supported; leave the embedding full rank"
        want = {"lora_A": (self.r, self.num_embeddings), "lora_B": (self.embedding_dim, self.r),
                "weight": (self.num_embeddings, self.embedding_dim)}
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                return f"{name} has shape {got}, expected {shape}"
        pad = self.padding_idx
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < self.num_embeddings):
            return f"padding_idx must be None or an int in [0, {self.num_embeddings}), got {pad!r}"
        problem = super().check()
        if problem is None and pad is not None and bool(self.lora_A[:, pad].ne(0).any()):
            # the forward masks it and its gradient is zero: only a direct write gets it there
            return (f"lora_A[:, padding_idx={self.padding_idx}] is nonzero: a merge would change the padding row "
                    "of the table, which nn.Embedding keeps fixed; zero that column")
        return problem

    @torch.no_grad()
    def to_base(self) -> nn.Embedding:
        """Merge the adapter and return a plain :class:`torch.nn.Embedding` holding the merged table.

        It shares this layer's ``weight`` Parameter (no copy), converted back to the factors' dtype if it was
        kept in another; ``lora_A`` is zeroed (this layer still computes the same function) and
        ``weight.requires_grad`` is what it was before adapting. Refused (:class:`~relora_ext.CycleRefused`,
        nothing changed) when :meth:`check` finds a problem.

        Example: ``emb = LoRAEmbedding(100, 16, r=4).to_base()``.
        """
        self.refuse_if_unfit("LoRAEmbedding.to_base")
        self.merge_()
        self.lora_A.zero_()
        if self.weight.dtype != self.lora_A.dtype:
            self.weight.data = self.weight.data.to(self.lora_A.dtype)
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           _weight=self.weight.detach(), device=self.weight.device, dtype=self.weight.dtype)
        self.weight.requires_grad_(self._weight_requires_grad)
        emb.weight = self.weight
        emb.train(self.training)
        return emb
