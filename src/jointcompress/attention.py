"""torch's `nn.MultiheadAttention` as four `nn.Linear` layers, so its projections are compressed.

`nn.MultiheadAttention` keeps its query / key / value projections in one `in_proj_weight`
parameter (`[3 * embed_dim, embed_dim]`) that belongs to no Linear layer, so the techniques,
which act on Linear and convolution weights, leave it as it is: in an `nn.TransformerEncoder`
that is three quarters of its attention weights and, with the usual 4x feed-forward width, a quarter
of every block's. `mha_to_linear` swaps each `nn.MultiheadAttention` for a
`LinearMultiheadAttention` that computes the same function with
`q_proj`, `k_proj`, `v_proj` and the original `out_proj` as plain Linear layers (the same step as
`hf.causal.conv1d_to_linear` for GPT-2). After `finalize`, `linear_to_mha` puts torch's own
module back, with the compressed weights, for code that expects it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conversions import named_hint, require_plain, swap_modules
from .errors import JointCompressError


class LinearMultiheadAttention(nn.Module):
    """`nn.MultiheadAttention`'s forward (same arguments, same outputs) over separate Linear
    projections. The class attributes below make torch's encoder fast paths, which read the packed
    `in_proj_*` tensors, take their general path instead."""

    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, out_proj: nn.Linear, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise JointCompressError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        factory = {"device": out_proj.weight.device, "dtype": out_proj.weight.dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = out_proj

    @classmethod
    @torch.no_grad()
    def from_mha(cls, mha: nn.MultiheadAttention, name: str = "") -> "LinearMultiheadAttention":
        """The same attention, its packed projection split into three Linear layers (exact copies)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise JointCompressError(
                f"'{name}': nn.MultiheadAttention with add_bias_kv or add_zero_attn is not converted (the extra key / "
                "value rows have no Linear form); its in_proj_weight stays uncompressed. Build it without them, or "
                "leave the module as it is")
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.out_proj, mha.kdim, mha.vdim, bias, mha.dropout, mha.batch_first)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if bias else (None, None, None)
        for linear, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
            linear.weight.copy_(w)
            if b is not None:
                linear.bias.copy_(b)
        return new.train(mha.training)

    @torch.no_grad()
    def to_mha(self, name: str = "") -> nn.MultiheadAttention:
        """torch's own module with these weights (after finalize: no parametrization left)."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        require_plain(name, (*projections, self.out_proj))
        if any(m.out_features != self.embed_dim for m in projections) or self.out_proj.in_features != self.embed_dim:
            raise JointCompressError(f"'{name}': its projections no longer have {self.embed_dim} channels (structured "
                                     "pruning shrank them), so nn.MultiheadAttention cannot hold them; keep this module")
        bias = self.q_proj.bias is not None
        w = self.out_proj.weight
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, bias, kdim=self.kdim, vdim=self.vdim,
                                    batch_first=self.batch_first, device=w.device, dtype=w.dtype)
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(torch.cat([m.weight for m in projections]))
        else:
            for packed, m in zip((mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight), projections):
                packed.copy_(m.weight)
        if bias:
            mha.in_proj_bias.copy_(torch.cat([m.bias for m in projections]))
        mha.out_proj = self.out_proj
        return mha.train(self.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        batched = query.dim() == 3
        q, k, v = (self._batch_first(t, batched) for t in (query, key, value))
        if key_padding_mask is not None and not batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        b, length, _ = q.shape
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        mask = self._additive_mask(attn_mask, key_padding_mask, is_causal, b, length, k.shape[2], q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            weights = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim ** -0.5 + (0 if mask is None else mask), -1)
            weights = F.dropout(weights, p) if p else weights  # torch returns the weights after dropout
            out = weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, self.embed_dim))
        if not batched:
            return out.squeeze(0), weights
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _batch_first(self, t: torch.Tensor, batched: bool) -> torch.Tensor:
        if not batched:
            return t.unsqueeze(0)
        return t if self.batch_first else t.transpose(0, 1)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, E] -> [B, heads, T, head_dim]."""
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def _additive_mask(self, attn_mask, key_padding_mask, is_causal, b, length, source, dtype):
        """torch's mask conventions (bool True = may not attend, float = added to the scores) as
        one float mask that broadcasts over [B, heads, L, S], or None."""
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=self.out_proj.weight.device).triu(1)
        mask = None
        if attn_mask is not None:
            mask = _as_float(attn_mask, dtype)
            mask = mask.view(-1, self.num_heads, length, source) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            padding = _as_float(key_padding_mask, dtype).view(b, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask


def _as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def mha_to_linear(model: nn.Module) -> nn.Module:
    """Every `nn.MultiheadAttention` in `model` replaced by a `LinearMultiheadAttention` computing the
    same function, in place; returns the model (the module itself if `model` is one). Call it on the
    model before `compress`, and on the model your `load` builder returns."""
    model = swap_modules(model, nn.MultiheadAttention, lambda m, name: LinearMultiheadAttention.from_mha(m, name))
    for module in model.modules():  # its nested-tensor path reads the packed projection
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
    return model


def linear_to_mha(model: nn.Module) -> nn.Module:
    """The reverse of `mha_to_linear` on a finalized model: torch's own `nn.MultiheadAttention` back,
    holding the compressed weights, in place; returns the model."""
    return swap_modules(model, LinearMultiheadAttention, lambda m, name: m.to_mha(name))


def packed_attention(model: nn.Module) -> list[str]:
    """Names of the `nn.MultiheadAttention` modules whose packed projection no technique compresses."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]


def packed_attention_hint(model: nn.Module) -> str:
    """A sentence for size errors and warnings: the packed attention projections left uncompressed,
    and the conversion that compresses them; empty when there are none."""
    return named_hint(packed_attention(model), "nn.MultiheadAttention keeps its query / key / value weights in one "
                      "in_proj_weight that no technique compresses",
                      "jointcompress.attention.mha_to_linear(model) turns them into Linear layers, exactly (and on the "
                      "model your load builder returns)")
