"""
The self-attention the layers run: nn.MultiheadAttention's output from its own parameters,
float32 under CPU autocast, and attention-weight dropout through the hashed op.
"""
import pytest
import torch
from torch import nn

from conditional_detr import ops
from conditional_detr.modeling.attention import multihead_attention, scaled_dot_product_attention
from conditional_detr.ops import reference


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_equals_torch_module(batch_first):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(32, 4, dropout=0.1, batch_first=batch_first).eval()
    shape = (2, 11, 32) if batch_first else (11, 2, 32)
    query, key, value = (torch.randn(shape) for _ in range(3))
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[1, 7:] = True
    expected = attention(query, key, value, key_padding_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(multihead_attention(attention, query, key, value, mask), expected)


def test_attention_runs_in_float32_under_cpu_autocast():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 20, 8).bfloat16() for _ in range(3))
    expected = scaled_dot_product_attention(q.float(), k.float(), v.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scaled_dot_product_attention(q, k, v)
        bfloat16_out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(bfloat16_out.float(), expected, atol=1e-3)


@pytest.mark.skipif(not ops.has_ops(), reason="the hashed dropout needs the compiled ops")
def test_training_drops_attention_weights_with_the_hashed_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 5:] = True
    torch.manual_seed(11)
    out = scaled_dot_product_attention(q, k, v, mask, dropout_p=0.3, training=True)
    torch.manual_seed(11)
    rng_state = torch.randint(0, 2**62, (1,), dtype=torch.int64)  # the seed ops.dropout draws
    logits = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(mask[:, None, None], float("-inf"))
    expected = reference.hashed_dropout(logits.softmax(-1), 0.3, rng_state) @ v
    torch.testing.assert_close(out, expected)
    # without training the weights are kept whole
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, mask, dropout_p=0.3),
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~mask[:, None, None]),
    )
