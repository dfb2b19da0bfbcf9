import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


def full_precision_attention(attention, *tensors, **kwargs):
    """
    `attention(*tensors, **kwargs)` (an nn.MultiheadAttention or scaled_dot_product_attention),
    in float32 while CPU autocast is on: the CPU's bfloat16 fused-attention kernels are slower
    than its float32 ones at DETR's lengths (forward and backward, 8 heads of 32 channels,
    2-core AVX-512 BF16 CPU: 20 queries 3.7 ms against 0.5, 352 tokens 12.7 ms against 9.9).
    Anywhere else it runs as it is.
    """
    if not (tensors[0].device.type == "cpu" and torch.is_autocast_enabled("cpu")):
        return attention(*tensors, **kwargs)
    with torch.autocast("cpu", enabled=False):
        return attention(*(t.float() for t in tensors), **kwargs)


class ProjectedSelfAttention(nn.Module):
    """
    Multi-head attention over already-projected queries, keys and values (the
    decoder projects content and position separately), followed by `out_proj`.
    """

    def __init__(self, d_model, nhead, dropout=0.0):
        super().__init__()
        self.nhead = nhead
        self.dropout = dropout
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, q, k, v):
        # [length, batch, d_model] -> [batch, heads, length, head_dim]
        def heads(x):
            length, batch, d_model = x.shape
            return x.reshape(length, batch, self.nhead, d_model // self.nhead).permute(1, 2, 0, 3)

        out = full_precision_attention(
            F.scaled_dot_product_attention, heads(q), heads(k), heads(v),
            dropout_p=self.dropout if self.training else 0.0,
        )
        num_queries, batch, d_model = q.shape
        out = out.permute(2, 0, 1, 3).reshape(num_queries, batch, d_model)
        return self.out_proj(out)


class ConditionalCrossAttention(nn.Module):
    """
    The paper's conditional cross-attention: per head, the attention logit is the
    content dot-product plus the spatial dot-product, then `out_proj`.
    Runs the compiled op or its PyTorch reference according to `impl`.
    """

    def __init__(self, d_model, nhead, dropout=0.0, impl="auto"):
        super().__init__()
        ops._check_impl(impl)
        self.nhead = nhead
        self.dropout = dropout
        self.impl = impl
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, q_content, q_spatial, k_content, k_spatial, value, key_padding_mask=None):
        out = ops.conditional_cross_attention(
            q_content, q_spatial, k_content, k_spatial, value, key_padding_mask, self.nhead,
            dropout_p=self.dropout, training=self.training, impl=self.impl,
        )
        return self.out_proj(out)
