"""The Former and the two light-weight cross-attention bridges of Mobile-Former.

Tokens are batch-first everywhere: ``[N, M, d]`` (batch, number of tokens, token width).
Feature maps are ``[N, C, H, W]``. The bridges split C into ``num_heads`` heads and use the
feature map itself as keys and values (Mobile->Former) or queries (Mobile<-Former): there are
no projections on the local side, which keeps their cost at O(M*H*W*C + M*d*C).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .layers import DropPath


def _split_heads(x, num_heads):
    """``[N, L, C]`` -> ``[N, heads, L, C/heads]``."""
    n, length, c = x.shape
    return x.view(n, length, num_heads, c // num_heads).transpose(1, 2)


def _merge_heads(x):
    """``[N, heads, L, C/heads]`` -> ``[N, L, C]``."""
    n, heads, length, ch = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * ch)


def _map_to_heads(x, num_heads):
    """``[N, C, H, W]`` -> ``[N, heads, HW, C/heads]``, a view in either memory format."""
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(n, h * w, num_heads, c // num_heads).transpose(1, 2)
    return x.reshape(n, num_heads, c // num_heads, h * w).transpose(2, 3)


def _heads_to_map(x, like):
    """``[N, heads, HW, C/heads]`` -> a map of ``like``'s shape ``[N, C, H, W]`` and memory format."""
    n, c, h, w = like.shape
    if like.is_contiguous(memory_format=torch.channels_last):
        return x.transpose(1, 2).reshape(n, h, w, c).permute(0, 3, 1, 2)
    return x.transpose(2, 3).reshape(n, c, h, w)


def _softmax(x, dim):
    """``torch.softmax(x, dim)``; exported to ONNX as its formula (max, subtract, exp, sum, divide)
    when ``dim`` is not the last axis: ONNX Runtime's ``Softmax`` kernel then transposes the tensor
    to put the axis last and back, which made it 4.8x slower than the formula's five element-wise
    kernels on the first bridge of mf26 at 640x640 (``[1, 2, 3, 25600]`` over axis 2)."""
    if torch.onnx.is_in_onnx_export() and dim not in (-1, x.dim() - 1):
        e = torch.exp(x - x.amax(dim, keepdim=True))
        return e / e.sum(dim, keepdim=True)
    return torch.softmax(x, dim)


class MobileToFormer(nn.Module):
    """Mobile -> Former: the tokens query the feature map (keys = values = the raw map).

    ``tokens <- LayerNorm(tokens + proj(gate(tokens) * Attention(q(tokens), x, x)))`` where
    ``gate = 2 * h_sigmoid(Linear(tokens))`` is the reference's dynamic gate.

    Args:
        channels: C of the feature map it reads.
        token_dim: d.
        num_heads: attention heads (C is split into heads).
        drop_path: stochastic-depth rate on the token update.
    """

    def __init__(self, channels, token_dim, num_heads=2, drop_path=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (channels // num_heads) ** -0.5
        self.gate = nn.Linear(token_dim, channels)
        self.q = nn.Linear(token_dim, channels)
        self.proj = nn.Linear(channels, token_dim)
        self.norm = nn.LayerNorm(token_dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, tokens, mask=None):
        """
        Args:
            x: ``[N, C, H, W]``.
            tokens: ``[N, M, d]``.
            mask: optional ``[N, 1, H, W]``, 1 (or True) inside the image, 0 on padding, which is not
                attended to.
        Returns:
            updated tokens, ``[N, M, d]``.
        """
        n, c, h, w = x.shape
        q = _split_heads(self.q(tokens), self.num_heads)                          # [N, h, M, C/h]
        kv = _map_to_heads(x, self.num_heads)                                     # [N, h, HW, C/h]
        # an additive bias, log(1) = 0 and log(0) = -inf: a bool mask is exported as a select on the
        # whole [N, h, M, HW] score tensor, the bias as an add, which runtimes broadcast faster
        attn_mask = None if mask is None else mask.reshape(n, 1, 1, h * w).to(q.dtype).log()
        out = F.scaled_dot_product_attention(
            q, kv.to(q.dtype), kv.to(q.dtype), attn_mask=attn_mask, scale=self.scale)
        out = _merge_heads(out) * (2.0 * F.hardsigmoid(self.gate(tokens)))        # [N, M, C]
        return self.norm(tokens + self.drop_path(self.proj(out)))


class Former(nn.Module):
    """The Former: a post-LN Transformer layer on the M tokens.

    Multi-head self-attention with a query projection only (keys = values = the tokens),
    an output projection, residual + LayerNorm; then FFN d -> 2d -> d with GELU,
    residual + LayerNorm.
    """

    def __init__(self, token_dim, num_heads=4, ffn_ratio=2, drop_path=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (token_dim // num_heads) ** -0.5
        self.q = nn.Linear(token_dim, token_dim)
        self.proj = nn.Linear(token_dim, token_dim)
        self.norm1 = nn.LayerNorm(token_dim)
        self.ffn = nn.Sequential()
        self.ffn.add_module("fc1", nn.Linear(token_dim, token_dim * ffn_ratio))
        self.ffn.add_module("act", nn.GELU())
        self.ffn.add_module("fc2", nn.Linear(token_dim * ffn_ratio, token_dim))
        self.norm2 = nn.LayerNorm(token_dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, tokens):
        """``[N, M, d]`` -> ``[N, M, d]``."""
        q = _split_heads(self.q(tokens), self.num_heads)
        kv = _split_heads(tokens, self.num_heads)
        out = _merge_heads(F.scaled_dot_product_attention(q, kv, kv, scale=self.scale))
        tokens = self.norm1(tokens + self.drop_path(self.proj(out)))
        return self.norm2(tokens + self.ffn(tokens))


class FormerToMobile(nn.Module):
    """Mobile <- Former: every pixel queries the tokens (queries = the raw map).

    ``x <- x + Attention(x, k(tokens), v(tokens))``, with no projection on the local side.

    Args:
        channels: C of the feature map it updates.
        token_dim: d.
        num_heads: attention heads.
        drop_path: stochastic-depth rate on the map update.
    """

    def __init__(self, channels, token_dim, num_heads=2, drop_path=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (channels // num_heads) ** -0.5
        self.k = nn.Linear(token_dim, channels)
        self.v = nn.Linear(token_dim, channels)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, tokens):
        """
        Args:
            x: ``[N, C, H, W]``.
            tokens: ``[N, M, d]``.
        Returns:
            ``[N, C, H, W]``.
        """
        n, c, h, w = x.shape
        # the scale goes on the keys (M tokens), not on the queries (every pixel)
        k = _split_heads(self.k(tokens) * self.scale, self.num_heads).to(x.dtype)     # [N, h, M, C/h]
        v = _split_heads(self.v(tokens), self.num_heads).to(x.dtype)                  # [N, h, M, C/h]
        # Scores as [N, h, M, HW], normalised over the M tokens: a softmax along HW-long rows where
        # [N, h, HW, M] would take one over each pixel's M (3-6) values, and a contiguous map is
        # already its queries' transpose [N, h, C/h, HW], so no transpose of the map either way.
        attn = _softmax(k @ _map_to_heads(x, self.num_heads).transpose(2, 3), dim=2)
        if x.is_contiguous(memory_format=torch.channels_last):
            out = _heads_to_map(attn.transpose(2, 3) @ v, x)                          # [N, h, HW, C/h] -> map
        else:
            out = (v.transpose(2, 3) @ attn).reshape(n, c, h, w)                      # [N, h, C/h, HW] -> map
        return x + self.drop_path(out)
