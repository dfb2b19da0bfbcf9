import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


def scaled_dot_product_attention(q, k, v, key_padding_mask=None, dropout_p=0.0, training=False, ops_impl="auto"):
    """
    softmax(q k^T / sqrt(head_dim), keys masked where key_padding_mask is True) v, over
    [batch, heads, length, head_dim]. Training with dropout computes the weights explicitly
    (as torch's CPU kernels do then too) and drops them through `ops.dropout`, which hashes
    its mask instead of drawing and keeping a Bernoulli one (as `ops_impl` says).

    Under CPU autocast it runs in float32: the CPU's bfloat16 fused-attention kernels are slower
    than its float32 ones at DETR's lengths, forward and backward.
    """
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return scaled_dot_product_attention(
                q.float(), k.float(), v.float(), key_padding_mask, dropout_p, training, ops_impl
            )
    if training and dropout_p > 0.0:
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        return ops.dropout(logits.softmax(-1), dropout_p, impl=ops_impl) @ v
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def split_heads(x, num_heads):
    """[length, batch, channels] -> [batch, heads, length, channels / heads]"""
    length, batch, channels = x.shape
    return x.reshape(length, batch, num_heads, channels // num_heads).permute(1, 2, 0, 3)


def merge_heads(x):
    """[batch, heads, length, head_dim] -> [length, batch, heads * head_dim]"""
    batch, num_heads, length, head_dim = x.shape
    return x.permute(2, 0, 1, 3).reshape(length, batch, num_heads * head_dim)


def multihead_attention(attention, query, key, value, key_padding_mask=None, ops_impl="auto"):
    """
    The output of nn.MultiheadAttention `attention` (need_weights=False) from its own
    parameters, its attention computed by `scaled_dot_product_attention` above: the same
    state dict as torch's module, with the faster dropout and CPU-autocast precision.
    """
    if attention.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    weights = attention.in_proj_weight.chunk(3)
    biases = attention.in_proj_bias.chunk(3) if attention.in_proj_bias is not None else (None,) * 3
    q, k, v = (
        split_heads(F.linear(x, w, b), attention.num_heads)
        for x, w, b in zip((query, key, value), weights, biases)
    )
    out = scaled_dot_product_attention(q, k, v, key_padding_mask, attention.dropout, attention.training, ops_impl)
    out = attention.out_proj(merge_heads(out))
    return out.transpose(0, 1) if attention.batch_first else out


def within_groups(attend, num_groups, *sequences):
    """
    attend(*sequences) with the queries in `num_groups` consecutive blocks of equal length,
    each attending only to its own block (Group DETR's training-time groups): the blocks of
    [num_groups * length, batch, channels] are moved into the batch for the call.
    """
    if num_groups == 1:
        return attend(*sequences)

    def fold(x):
        total, batch, channels = x.shape
        return x.view(num_groups, total // num_groups, batch, channels).transpose(0, 1).flatten(1, 2)

    out = attend(*(fold(x) for x in sequences))
    length, folded_batch, channels = out.shape
    return out.view(length, num_groups, folded_batch // num_groups, channels).transpose(0, 1).flatten(0, 1)


class ProjectedSelfAttention(nn.Module):
    """
    Multi-head attention over already-projected queries, keys and values (the
    decoder projects content and position separately), followed by `out_proj`.
    """

    ops_impl = "auto"  # for the dropout, set by ops.set_implementation

    def __init__(self, d_model, nhead, dropout=0.0):
        super().__init__()
        self.nhead = nhead
        self.dropout = dropout
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, q, k, v):
        out = scaled_dot_product_attention(
            *(split_heads(x, self.nhead) for x in (q, k, v)), dropout_p=self.dropout, training=self.training,
            ops_impl=self.ops_impl,
        )
        return self.out_proj(merge_heads(out))


class ConditionalCrossAttention(nn.Module):
    """
    The paper's conditional cross-attention: per head, the attention logit is the
    content dot-product plus the spatial dot-product, then `out_proj`.
    Runs the compiled op or its PyTorch reference according to `ops_impl`.
    """

    ops_impl = "auto"  # the model's MODEL.DETR.OPS_IMPL, set by ops.set_implementation

    def __init__(self, d_model, nhead, dropout=0.0):
        super().__init__()
        self.nhead = nhead
        self.dropout = dropout
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, q_content, q_spatial, k_content, k_spatial, value, key_padding_mask=None):
        out = ops.conditional_cross_attention(
            q_content, q_spatial, k_content, k_spatial, value, key_padding_mask, self.nhead,
            dropout_p=self.dropout, training=self.training, impl=self.ops_impl,
        )
        return self.out_proj(out)
