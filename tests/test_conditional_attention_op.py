"""
The compiled ops (`conditional_detr._C`) against the pure-PyTorch reference: gradients in
float64, odd sizes, padding, non-contiguous and empty inputs, every dtype, dropout, operator
registration (opcheck, torch.compile) and FLOP counting.
"""
import pytest
from fvcore.nn import FlopCountAnalysis
import torch
from torch import nn

from conditional_detr import ops
from conditional_detr.ops import reference

from helpers.ops import (
    DEVICES, LOW_PRECISION, assert_compiles_without_graph_break, assert_flash_attention_rule, attention_inputs,
    detached_copy, dropout_keep_mask, padding_mask, requires_ops,
)

pytestmark = requires_ops


def run(impl, tensors, mask, num_heads, grad_out=None):
    out = ops.conditional_cross_attention(*tensors, mask, num_heads, impl=impl)
    if grad_out is None:
        return out, None
    grads = torch.autograd.grad(out, tensors, grad_out.to(out.dtype))
    return out, grads


def assert_compiled_matches_reference(tensors, mask, num_heads, grad_out):
    """fp32 output and input gradients of the compiled op against the reference; the grads."""
    out, grads = run("compiled", tensors, mask, num_heads, grad_out)
    expected, expected_grads = run("pytorch", detached_copy(tensors), mask, num_heads, grad_out)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=5e-5, rtol=1e-4)
    return grads


# ---------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_gradcheck(device, with_mask):
    tensors = attention_inputs(5, 7, 3, 8, device, torch.float64, value_channels=12)
    mask = padding_mask(3, 7, device, fully_padded=(2,)) if with_mask else None
    assert torch.autograd.gradcheck(
        lambda *t: ops.conditional_cross_attention(*t, mask, 2, impl="compiled"), tensors
    )


@pytest.mark.parametrize("device", DEVICES)
def test_attention_gradcheck_with_dropout(device):
    # a fixed rng_state makes the dropout mask a fixed function of the inputs
    tensors = attention_inputs(4, 6, 2, 8, device, torch.float64)
    rng_state = torch.tensor([1234], dtype=torch.int64)
    mask = padding_mask(2, 6, device)

    def attention(*t):
        return torch.ops.conditional_detr.conditional_cross_attention(*t, mask, 2, 0.3, rng_state)[0]

    assert torch.autograd.gradcheck(attention, tensors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [8, 32, None])
def test_spatial_query_gradcheck(device, dim):
    points = torch.rand(3, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    if dim is None:
        assert torch.autograd.gradcheck(
            lambda p: ops.conditional_spatial_query(p, None, impl="compiled"), [points]
        )
    else:
        scale = torch.randn(3, 2, dim, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda p, s: ops.conditional_spatial_query(p, s, impl="compiled"), [points, scale]
        )


# ------------------------------------------------------------ compiled against reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "num_queries,num_keys,batch,channels,heads",
    [(37, 53, 3, 64, 4), (70, 301, 2, 256, 8), (1, 1, 1, 4, 1), (65, 600, 1, 48, 2)],
)
def test_attention_matches_reference(device, num_queries, num_keys, batch, channels, heads):
    tensors = attention_inputs(num_queries, num_keys, batch, channels, device)
    mask = padding_mask(batch, num_keys, device)
    grad_out = torch.randn(num_queries, batch, channels, device=device)
    assert_compiled_matches_reference(tensors, mask, heads, grad_out)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_without_mask_and_different_value_width(device):
    tensors = attention_inputs(9, 11, 2, 16, device, value_channels=24)
    grad_out = torch.randn(9, 2, 24, device=device)
    assert_compiled_matches_reference(tensors, None, 4, grad_out)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_with_padding_inside_the_keys(device):
    # an image padded on the right pads the end of every row of its feature map: padded keys
    # before unpadded ones, across key-block boundaries, and a padded tail
    height, width = 23, 29
    mask = torch.zeros(2, height, width, dtype=torch.bool)
    mask[0, :, 21:] = True
    mask[1, 17:, :] = True
    mask[1, :, 25:] = True
    mask = mask.flatten(1).to(device)
    tensors = attention_inputs(70, height * width, 2, 64, device)
    grad_out = torch.randn(70, 2, 64, device=device)
    grads = assert_compiled_matches_reference(tensors, mask, 4, grad_out)
    # padded keys get no gradient
    for g in grads[2:]:
        assert g.transpose(0, 1)[mask].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_attention_fully_padded_batch_element(device):
    tensors = attention_inputs(6, 9, 3, 16, device)
    mask = padding_mask(3, 9, device, fully_padded=(1,))
    grad_out = torch.randn(6, 3, 16, device=device)
    out, grads = run("compiled", tensors, mask, 2, grad_out)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert (out[:, 1] == 0).all()
    assert (grads[0][:, 1] == 0).all() and (grads[2][:, 1] == 0).all() and (grads[4][:, 1] == 0).all()
    expected, expected_grads = run("pytorch", detached_copy(tensors), mask, 2, grad_out)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_non_contiguous_inputs(device):
    generator = torch.Generator().manual_seed(1)

    def batch_first(length):  # [batch, length, 2 * channels] viewed as [length, batch, channels]
        t = torch.randn(3, length, 64, generator=generator).to(device)
        return t[..., ::2].transpose(0, 1).requires_grad_(True)

    def padded_channels(length):  # channel-contiguous rows inside a wider buffer
        t = torch.randn(length, 3, 48, generator=generator).to(device)
        return t[..., 8:40].requires_grad_(True)

    tensors = [batch_first(13), padded_channels(13), batch_first(21), padded_channels(21),
               batch_first(21)]
    # leaves that are views: grads flow back to these
    tensors = [t.detach().requires_grad_(True) for t in tensors]
    assert not any(t.is_contiguous() for t in tensors)
    mask = padding_mask(3, 21, device).t().contiguous().t()  # transposed twice: same values
    grad_out = torch.randn(13, 3, 32, device=device)
    out, grads = run("compiled", tensors, mask, 4, grad_out)
    contiguous = [t.detach().contiguous().requires_grad_(True) for t in tensors]
    expected, expected_grads = run("pytorch", contiguous, mask, 4, grad_out)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_queries,num_keys,batch", [(5, 7, 0), (0, 7, 2), (5, 0, 2)])
def test_attention_empty(device, num_queries, num_keys, batch):
    tensors = attention_inputs(num_queries, num_keys, batch, 8, device)
    mask = torch.zeros(batch, num_keys, dtype=torch.bool, device=device)
    out = ops.conditional_cross_attention(*tensors, mask, 2, impl="compiled")
    expected = torch.zeros(num_queries, batch, 8, device=device)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    for t in tensors:
        assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_attention_low_precision(device, dtype):
    # against an fp32 reference
    tensors = attention_inputs(45, 77, 2, 64, device)
    mask = padding_mask(2, 77, device)
    grad_out = torch.randn(45, 2, 64, device=device)
    exact, exact_grads = run("pytorch", detached_copy(tensors), mask, 4, grad_out)
    plain, plain_grads = run("pytorch", detached_copy(tensors, dtype), mask, 4, grad_out)
    out, grads = run("compiled", detached_copy(tensors, dtype), mask, 4, grad_out)
    assert_flash_attention_rule(dtype, exact, exact_grads, plain, plain_grads, out, grads)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_mixed_dtypes_promote(device):
    tensors = attention_inputs(6, 8, 2, 16, device)
    tensors[4] = tensors[4].detach().double()
    out = ops.conditional_cross_attention(*tensors, None, 2, impl="compiled")
    expected = ops.conditional_cross_attention(
        *[t.double() for t in tensors], None, 2, impl="pytorch"
    )
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW_PRECISION])
@pytest.mark.parametrize("dim", [256, 64, None])
def test_spatial_query_matches_reference(device, dtype, dim):
    points = torch.rand(7, 3, 2, device=device).to(dtype).requires_grad_(True)
    scale = None if dim is None else torch.randn(7, 3, dim, device=device).to(dtype).requires_grad_(True)
    inputs = [points] if scale is None else [points, scale]
    out = ops.conditional_spatial_query(points, scale, impl="compiled")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)
    copies = detached_copy(inputs, torch.float64)
    expected = reference.conditional_spatial_query(*copies) if scale is not None else \
        reference.conditional_spatial_query(copies[0], None)
    expected_grads = torch.autograd.grad(expected, copies, grad.double())
    assert out.dtype == dtype and out.shape == expected.shape
    # the reference evaluates the sinusoid in fp32 whatever the input dtype
    tol = {torch.float16: 1e-2, torch.bfloat16: 6e-2}.get(dtype, 2e-5)
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    for g, e in zip(grads, expected_grads):
        # d/dp of the high frequencies scales with 2π: allow for it in the point gradient
        torch.testing.assert_close(g.double(), e, atol=tol * 50, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_spatial_query_expanded_identity_scale(device):
    # the first decoder layer passes λq = 1 as an expanded (stride-0) tensor
    points = torch.rand(5, 2, 2, device=device, requires_grad=True)
    ones = torch.ones((), device=device, requires_grad=True)
    scale = ones.expand(5, 2, 256)
    out = ops.conditional_spatial_query(points, scale, impl="compiled")
    torch.testing.assert_close(out, ops.conditional_spatial_query(points, None, impl="compiled"))
    out.sum().backward()
    assert ones.grad is not None and torch.isfinite(ones.grad)


# ------------------------------------------------------------------------------ dropout


def attention_with_keep_mask(q_c, q_p, k_c, k_p, v, mask, heads, keep, p):
    num_queries, batch, channels = q_c.shape
    num_keys = k_c.shape[0]
    hd = channels // heads

    def split(x, length, width):  # -> [batch, heads, length, width]
        return x.reshape(length, batch, heads, width).permute(1, 2, 0, 3)

    q = torch.cat([split(q_c, num_queries, hd), split(q_p, num_queries, hd)], -1)
    k = torch.cat([split(k_c, num_keys, hd), split(k_p, num_keys, hd)], -1)
    logits = q @ k.transpose(-1, -2) * (2 * hd) ** -0.5
    logits = logits.masked_fill(mask[:, None, None, :], float("-inf"))
    weights = torch.softmax(logits, -1) * keep.view_as(logits).to(logits.dtype) / (1 - p)
    out = weights @ split(v, num_keys, v.shape[-1] // heads)
    return out.permute(2, 0, 1, 3).reshape(num_queries, batch, -1)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_matches_explicit_mask(device):
    p, seed, heads = 0.25, 987654321, 2
    tensors = attention_inputs(9, 70, 2, 16, device, torch.float64)
    mask = padding_mask(2, 70, device)
    rng_state = torch.tensor([seed], dtype=torch.int64)
    out = torch.ops.conditional_detr.conditional_cross_attention(*tensors, mask, heads, p, rng_state)[0]
    keep = dropout_keep_mask(seed, 2 * heads * 9 * 70, p).to(device)
    copies = detached_copy(tensors)
    expected = attention_with_keep_mask(*copies, mask, heads, keep, p)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, tensors, grad_out)
    expected_grads = torch.autograd.grad(expected, copies, grad_out)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_follows_torch_seed(device):
    tensors = attention_inputs(8, 30, 2, 16, device, requires_grad=False)

    def sample():
        return ops.conditional_cross_attention(
            *tensors, None, 2, dropout_p=0.5, training=True, impl="compiled"
        )

    torch.manual_seed(3)
    first = sample()
    torch.manual_seed(3)
    torch.testing.assert_close(sample(), first)
    assert not torch.equal(sample(), first)
    no_dropout = ops.conditional_cross_attention(*tensors, None, 2, dropout_p=0.5, training=False,
                                                 impl="compiled")
    torch.testing.assert_close(
        no_dropout, ops.conditional_cross_attention(*tensors, None, 2, impl="pytorch"),
        atol=2e-5, rtol=1e-4,
    )


def test_dropout_keeps_expected_fraction():
    keep = dropout_keep_mask(42, 200_000, 0.1)
    assert abs(keep.double().mean().item() - 0.9) < 0.005


# ------------------------------------------------------------------ dispatch and errors


def test_impl_validation():
    tensors = attention_inputs(2, 3, 1, 4, "cpu")
    with pytest.raises(ValueError, match="OPS_IMPL"):
        ops.conditional_cross_attention(*tensors, None, 1, impl="fast")
    assert ops.has_ops_for("cpu") and ops.unavailable_reason("cpu") is None
    assert "no kernels" in ops.unavailable_reason("xpu")


def test_compiled_raises_where_unavailable():
    points = torch.rand(2, 1, 2, device="meta")
    with pytest.raises(RuntimeError, match="impl='compiled'"):
        ops.conditional_spatial_query(points, None, impl="compiled")


def test_kernel_input_checks():
    tensors = attention_inputs(4, 5, 2, 8, "cpu", requires_grad=False)
    bad_mask = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="key_padding_mask must be"):
        torch.ops.conditional_detr.conditional_cross_attention(*tensors, bad_mask, 2, 0.0, None)
    with pytest.raises(RuntimeError, match="divisible by num_heads"):
        torch.ops.conditional_detr.conditional_cross_attention(*tensors, None, 3, 0.0, None)
    with pytest.raises(RuntimeError, match="dim must be a positive multiple of 4"):
        torch.ops.conditional_detr.conditional_spatial_query(torch.rand(3, 2, 2), None, 6)


# ------------------------------------------------------------------------ registration


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    tensors = attention_inputs(5, 7, 2, 8, device)
    mask = padding_mask(2, 7, device)
    torch.library.opcheck(torch.ops.conditional_detr.conditional_cross_attention,
                          (*tensors, mask, 2, 0.0, None))
    torch.library.opcheck(torch.ops.conditional_detr.conditional_cross_attention,
                          (*tensors, None, 2, 0.2, torch.tensor([7], dtype=torch.int64)))
    points = torch.rand(5, 2, 2, device=device, requires_grad=True)
    scale = torch.randn(5, 2, 16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.conditional_detr.conditional_spatial_query, (points, scale, 16))
    torch.library.opcheck(torch.ops.conditional_detr.conditional_spatial_query, (points, None, 8))


def decoder_layer_module(d_model, heads):
    """The model's decoder layer fed the compiled spatial query, as the decoder calls it."""
    from conditional_detr.modeling.conditional_detr import ConditionalDecoderLayer

    class LayerWithSpatialQuery(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = ConditionalDecoderLayer(d_model, heads, 2 * d_model, 0.0, False)
            ops.set_implementation(self.layer, "compiled")
            self.query_scale = nn.Linear(d_model, d_model)

        def forward(self, tgt, memory, mask, pos, query_pos, reference_points):
            spatial_query = ops.conditional_spatial_query(
                reference_points, self.query_scale(tgt), impl="compiled"
            )
            return self.layer(tgt, memory, mask, pos, query_pos, spatial_query)

    return LayerWithSpatialQuery()


def test_torch_compile_decoder_layer_without_graph_break():
    torch.manual_seed(0)
    d_model, heads, num_queries, num_keys, batch = 32, 4, 6, 10, 2
    module = decoder_layer_module(d_model, heads)
    inputs = (
        torch.randn(num_queries, batch, d_model), torch.randn(num_keys, batch, d_model),
        padding_mask(batch, num_keys, "cpu"), torch.randn(num_keys, batch, d_model),
        torch.randn(num_queries, batch, d_model), torch.rand(num_queries, batch, 2),
    )
    assert_compiles_without_graph_break(module, inputs)


# ------------------------------------------------------------------------------ fvcore


def test_fvcore_counts_match_reference():

    class Attention(nn.Module):
        def __init__(self, impl):
            super().__init__()
            self.impl = impl

        def forward(self, q_c, q_p, k_c, k_p, v, mask, points, scale):
            spatial = ops.conditional_spatial_query(points, scale, impl=self.impl)
            return ops.conditional_cross_attention(q_c + spatial, q_p, k_c, k_p, v, mask, 4,
                                                   impl=self.impl)

    tensors = attention_inputs(11, 19, 2, 32, "cpu", requires_grad=False)
    inputs = (*tensors, padding_mask(2, 19, "cpu"), torch.rand(11, 2, 2), torch.randn(11, 2, 32))
    totals = {}
    for impl in ("compiled", "pytorch"):
        analysis = FlopCountAnalysis(Attention(impl).eval(), inputs)
        analysis.set_op_handle(**ops.fvcore_handles())
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        totals[impl] = analysis.total()
        if impl == "compiled":
            assert not any(name.startswith("conditional_detr::") for name in analysis.unsupported_ops())
    assert totals["compiled"] == totals["pytorch"] > 0
