"""
The compiled multi-scale deformable attention against its pure-PyTorch reference (grid_sample)
and the official fixture: gradients in float64, odd level sizes, points outside the maps and
exactly on their borders, empty and non-contiguous inputs, every dtype, input checks and
operator registration (opcheck, torch.compile).
"""
import pytest
import torch
from torch import nn

from conditional_detr import ops

from helpers.official import reference_file
from helpers.ops import (
    DEVICES, LOW_PRECISION, assert_compiles_without_graph_break, assert_flash_attention_rule, detached_copy,
    requires_ops,
)

pytestmark = requires_ops

# odd sizes: a single pixel, a single row and column, odd heights and widths
ODD_LEVELS = [(1, 1), (1, 7), (7, 1), (5, 9), (13, 19)]


def level_tensors(levels, device):
    spatial_shapes = torch.tensor(levels, dtype=torch.int64, device=device)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def deformable_inputs(batch, levels, num_queries, heads, channels, points, device,
                      dtype=torch.float32, spread=(-0.3, 1.3), seed=0, requires_grad=True):
    """[value, spatial_shapes, level_start_index, sampling_locations, attention_weights];
    locations uniform in `spread`, so that some points fall outside the maps."""
    generator = torch.Generator().manual_seed(seed)
    num_values = sum(h * w for h, w in levels)
    value = torch.randn(batch, num_values, heads, channels, generator=generator,
                        dtype=torch.float64)
    low, high = spread
    locations = low + (high - low) * torch.rand(
        batch, num_queries, heads, len(levels), points, 2, generator=generator, dtype=torch.float64
    )
    logits = torch.randn(batch, num_queries, heads, len(levels) * points, generator=generator,
                         dtype=torch.float64)
    weights = logits.softmax(-1).view(batch, num_queries, heads, len(levels), points)
    value, locations, weights = (
        t.to(device=device, dtype=dtype).requires_grad_(requires_grad)
        for t in (value, locations, weights)
    )
    return [value, *level_tensors(levels, device), locations, weights]


def differentiable(inputs):
    return [inputs[0], inputs[3], inputs[4]]


def with_differentiable(inputs, new):
    return [new[0], inputs[1], inputs[2], new[1], new[2]]


def run(impl, inputs, grad_out=None):
    out = ops.multi_scale_deformable_attention(*inputs, impl=impl)
    if grad_out is None:
        return out, None
    return out, torch.autograd.grad(out, differentiable(inputs), grad_out.to(out.dtype))


def copies(inputs, dtype=None):
    return with_differentiable(inputs, detached_copy(differentiable(inputs), dtype))


def assert_compiled_matches_reference(inputs, grad_out, atol=1e-4, rtol=1e-4):
    out, grads = run("compiled", inputs, grad_out)
    expected, expected_grads = run("pytorch", copies(inputs), grad_out)
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    names = ("value", "sampling_locations", "attention_weights")
    for g, e, name in zip(grads, expected_grads, names):
        torch.testing.assert_close(g, e, atol=atol, rtol=rtol, msg=lambda m: f"grad of {name}: {m}")
    return out, grads


# ---------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    inputs = deformable_inputs(2, [(3, 4), (1, 1), (2, 5)], 3, 2, 3, 2, device, torch.float64)

    def attention(value, locations, weights):
        return ops.multi_scale_deformable_attention(
            value, inputs[1], inputs[2], locations, weights, impl="compiled"
        )

    assert torch.autograd.gradcheck(attention, differentiable(inputs))


# ------------------------------------------------------------ compiled against reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "batch,levels,num_queries,heads,channels,points",
    [
        (2, ODD_LEVELS, 37, 3, 32, 4),  # 32 channels: whole vectors
        (1, ODD_LEVELS[::-1], 5, 2, 13, 3),  # a vector and a scalar tail
        (3, [(6, 4), (3, 2)], 9, 1, 35, 1),  # four vectors and a tail
        (1, [(1, 1)], 1, 1, 1, 1),
        (1, [(5, 9)], 7, 5, 8, 3),  # one level: the CPU backward splits the heads into groups
    ],
)
def test_matches_reference(device, batch, levels, num_queries, heads, channels, points):
    inputs = deformable_inputs(batch, levels, num_queries, heads, channels, points, device)
    grad_out = torch.randn(batch, num_queries, heads * channels, device=device)
    assert_compiled_matches_reference(inputs, grad_out)


@pytest.mark.parametrize("device", DEVICES)
def test_points_outside_and_on_the_borders(device):
    # locations k / 16 land exactly (in binary floating point, for grid_sample's arithmetic
    # too) on pixel centres, pixel edges, the map borders (0, 1), one pixel beyond them and far
    # outside, where bilinear interpolation has kinks: both must take the same side of them
    levels = [(1, 1), (2, 8), (4, 3), (1, 5)]
    inputs = deformable_inputs(2, levels, 16, 2, 8, 6, device, torch.float64)
    generator = torch.Generator().manual_seed(5)
    grid = torch.randint(-24, 41, inputs[3].shape, generator=generator).double() / 16
    grid[0, 0, 0, :, :, 0] = torch.tensor([0.0, 1.0, -0.5, 1.5, 100.0, -1e9])  # x only
    grid[0, 1, 0, :, :, 1] = torch.tensor([0.0, 1.0, -0.5, 1.5, -100.0, 1e9])  # y only
    inputs[3] = grid.to(device).requires_grad_(True)
    grad_out = torch.randn(2, 16, 16, dtype=torch.float64, device=device)
    out, grads = assert_compiled_matches_reference(inputs, grad_out, atol=1e-12, rtol=1e-12)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("device", DEVICES)
def test_every_point_outside_reads_zero(device):
    inputs = deformable_inputs(2, [(3, 5), (2, 2)], 4, 2, 8, 2, device, spread=(1.6, 3.0))
    out, grads = run("compiled", inputs, torch.randn(2, 4, 16, device=device))
    assert (out == 0).all() and all((g == 0).all() for g in grads[:2])
    # the weights' gradient is the sample, zero here too
    assert (grads[2] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,num_queries", [(0, 5), (2, 0), (0, 0)])
def test_empty(device, batch, num_queries):
    inputs = deformable_inputs(batch, [(3, 4), (2, 2)], num_queries, 2, 8, 3, device)
    out = ops.multi_scale_deformable_attention(*inputs, impl="compiled")
    assert out.shape == (batch, num_queries, 16)
    expected = ops.multi_scale_deformable_attention(*copies(inputs), impl="pytorch")
    assert expected.shape == out.shape
    out.sum().backward()
    for t in differentiable(inputs):
        assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    levels = [(5, 9), (3, 4)]
    dense = deformable_inputs(2, levels, 11, 4, 8, 3, device, requires_grad=False)
    generator = torch.Generator().manual_seed(3)
    # value as a head-first projection viewed sequence-first, locations as the (x, y) of a wider
    # last dimension, weights transposed twice
    value = dense[0].permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    wide = torch.rand(*dense[3].shape[:-1], 4, generator=generator).to(device) * 1.4 - 0.2
    locations = wide[..., 1:3]
    weights = dense[4].transpose(1, 2).contiguous().transpose(1, 2)
    inputs = [value, dense[1], dense[2], locations, weights]
    assert not any(t.is_contiguous() for t in differentiable(inputs))
    inputs = with_differentiable(inputs, [t.requires_grad_(True) for t in differentiable(inputs)])
    grad_out = torch.randn(11, 2, 32, device=device).transpose(0, 1)  # non-contiguous too
    out, grads = run("compiled", inputs, grad_out)
    contiguous = with_differentiable(
        inputs, [t.detach().contiguous().requires_grad_(True) for t in differentiable(inputs)]
    )
    expected, expected_grads = run("pytorch", contiguous, grad_out.contiguous())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
def test_precision(device, dtype):
    # against a float64 reference
    inputs = deformable_inputs(2, ODD_LEVELS, 50, 4, 32, 4, device, torch.float64)
    grad_out = torch.randn(2, 50, 128, dtype=torch.float64, device=device)
    exact, exact_grads = run("pytorch", copies(inputs), grad_out)
    plain, plain_grads = run("pytorch", copies(inputs, dtype), grad_out)
    out, grads = run("compiled", copies(inputs, dtype), grad_out)
    assert_flash_attention_rule(dtype, exact, exact_grads, plain, plain_grads, out, grads)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_promote(device):
    # under autocast the value projection is low precision but the locations stay float32
    inputs = deformable_inputs(1, [(4, 6), (2, 3)], 7, 2, 8, 2, device, requires_grad=False)
    inputs[0] = inputs[0].to(torch.bfloat16)
    out = ops.multi_scale_deformable_attention(*inputs, impl="compiled")
    assert out.dtype == torch.float32
    expected = ops.multi_scale_deformable_attention(*copies(inputs, torch.float32), impl="pytorch")
    torch.testing.assert_close(out, expected)


# ------------------------------------------------------------------- official fixture


@pytest.mark.parametrize("impl", ["compiled", "pytorch"])
def test_matches_official_core(impl):
    fixture = torch.load(reference_file("official_msdeform_attn_op.pth"))
    leaves = [fixture[k].clone().requires_grad_(True)
              for k in ("value", "sampling_locations", "attention_weights")]
    inputs = [leaves[0], fixture["spatial_shapes"], fixture["level_start_index"], *leaves[1:]]
    out, grads = run(impl, inputs, fixture["grad_projection"])
    torch.testing.assert_close(out, fixture["output"], atol=1e-12, rtol=1e-12)
    for g, name in zip(grads, ("grad_value", "grad_sampling_locations", "grad_attention_weights")):
        torch.testing.assert_close(g, fixture[name], atol=1e-12, rtol=1e-12, msg=name)


# ------------------------------------------------------------------ dispatch and errors


def test_auto_uses_compiled_op_on_cpu():
    inputs = deformable_inputs(1, [(2, 3)], 2, 1, 4, 1, "cpu", requires_grad=False)
    ops.multi_scale_deformable_attention(*inputs)  # the first use checks the kernel against the reference
    with torch.profiler.profile() as profile:
        ops.multi_scale_deformable_attention(*inputs)
    names = {event.name for event in profile.events()}
    assert "conditional_detr::multi_scale_deformable_attention" in names
    assert "aten::grid_sampler_2d" not in names


def test_compiled_raises_where_unavailable():
    inputs = deformable_inputs(1, [(2, 3)], 2, 1, 4, 1, "meta", requires_grad=False)
    with pytest.raises(RuntimeError, match="impl='compiled'"):
        ops.multi_scale_deformable_attention(*inputs, impl="compiled")


def test_input_checks_name_the_argument():
    value, shapes, starts, locations, weights = deformable_inputs(
        2, [(3, 4), (2, 2)], 5, 2, 8, 3, "cpu", requires_grad=False
    )
    op = torch.ops.conditional_detr.multi_scale_deformable_attention
    cases = [
        ((value[0], shapes, starts, locations, weights), "value must be"),
        ((value, shapes, starts, locations[..., :1], weights), "sampling_locations must be"),
        ((value, shapes, starts, locations, weights[:, :, :1]), "attention_weights must be"),
        ((value, shapes[:1], starts[:1], locations, weights), r"sampling_locations must be"),
        ((value, shapes, starts[:1], locations, weights), "level_start_index must be"),
        ((value, shapes.int(), starts, locations, weights), "spatial_shapes must be int64"),
        ((value, shapes, starts, locations.double(), weights), "sampling_locations has dtype"),
        ((value.int(), shapes, starts, locations, weights), "value must be float32"),
        ((value, shapes, starts + 1, locations, weights), r"level_start_index\[0\] is 1"),
        ((value[:, :-1], shapes, starts, locations, weights), "spatial_shapes hold 16 values"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    backward = torch.ops.conditional_detr._multi_scale_deformable_attention_backward
    with pytest.raises(RuntimeError, match="grad_output must be"):
        backward(torch.zeros(2, 5, 8), value, shapes, starts, locations, weights)


# ------------------------------------------------------------------------ registration


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    inputs = deformable_inputs(2, [(3, 4), (1, 3)], 5, 2, 8, 2, device)
    torch.library.opcheck(torch.ops.conditional_detr.multi_scale_deformable_attention, inputs)


class DeformableSampling(nn.Module):
    """A minimal MSDeformAttn: offsets and weights from the queries, then the op."""

    def __init__(self, dim, heads, num_levels, points):
        super().__init__()
        self.heads, self.num_levels, self.points = heads, num_levels, points
        self.offsets = nn.Linear(dim, heads * num_levels * points * 2)
        self.weights = nn.Linear(dim, heads * num_levels * points)
        self.value = nn.Linear(dim, dim)

    def forward(self, query, reference_points, source, spatial_shapes, level_start_index):
        batch, num_queries, dim = query.shape
        shape = (batch, num_queries, self.heads, self.num_levels, self.points)
        offsets = self.offsets(query).view(*shape, 2)
        normalizer = spatial_shapes.flip(-1).to(query.dtype)[:, None, :]  # [L, 1, (W, H)]
        locations = reference_points[:, :, None, None, None, :] + offsets / normalizer
        weights = self.weights(query).view(batch, num_queries, self.heads, -1).softmax(-1)
        weights = weights.view(shape)
        value = self.value(source).view(batch, source.shape[1], self.heads, dim // self.heads)
        return ops.multi_scale_deformable_attention(
            value, spatial_shapes, level_start_index, locations, weights, impl="compiled"
        )


def test_torch_compile_without_graph_break():
    torch.manual_seed(0)
    levels = [(5, 7), (3, 4)]
    module = DeformableSampling(16, 2, len(levels), 3)
    spatial_shapes, level_start_index = level_tensors(levels, "cpu")
    inputs = (torch.randn(2, 6, 16), torch.rand(2, 6, 2), torch.randn(2, 47, 16), spatial_shapes,
              level_start_index)
    assert_compiles_without_graph_break(module, inputs)
