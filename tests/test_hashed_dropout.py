"""
The hashed dropout: the compiled op against its PyTorch twin bit for bit, its gradient, its
seeding from torch's generator, the fallback, and the Dropout module the layers use.
"""
import pytest
import torch
import torch.nn.functional as F

from conditional_detr import ops
from conditional_detr.modeling.transformer import Dropout
from conditional_detr.ops import reference, self_check

from helpers.ops import DEVICES, dropout_keep_mask, requires_ops

RNG_STATE = torch.tensor([987654321], dtype=torch.int64)


def test_reference_mask_is_the_kernels_hash():
    # the numpy rendering of the kernels' hash (test_ops) and the torch one agree everywhere
    expected = dropout_keep_mask(int(RNG_STATE), 3 * 50 * 7, 0.3)
    torch.testing.assert_close(reference.dropout_keep_mask(RNG_STATE, (3, 50, 7), 0.3).flatten(), expected)
    negative_seed = torch.tensor([-5], dtype=torch.int64)
    assert reference.dropout_keep_mask(negative_seed, (1000,), 0.5).float().mean().item() == pytest.approx(0.5, abs=0.06)


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_compiled_equals_reference(device, dtype):
    x = torch.randn(4, 33, 17, dtype=torch.float64).to(device=device, dtype=dtype)
    for p in (0.1, 0.5, 0.9):
        out = torch.ops.conditional_detr.dropout(x, p, RNG_STATE)
        torch.testing.assert_close(out, reference.hashed_dropout(x, p, RNG_STATE), rtol=0, atol=0)


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input_is_hashed_by_its_row_major_index(device):
    x = torch.randn(17, 33, device=device).t()
    out = torch.ops.conditional_detr.dropout(x, 0.4, RNG_STATE)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference.hashed_dropout(x.contiguous(), 0.4, RNG_STATE), rtol=0, atol=0)


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
def test_gradient_uses_the_same_mask(device):
    x = torch.randn(6, 40, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.conditional_detr.dropout(t, 0.3, RNG_STATE), [x])
    out = torch.ops.conditional_detr.dropout(x, 0.3, RNG_STATE)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    torch.testing.assert_close(grad, (out != 0).double() / 0.7)
    torch.library.opcheck(torch.ops.conditional_detr.dropout.default, (x, 0.3, RNG_STATE))


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
def test_dropout_follows_torch_seed_and_keeps_its_fraction(device):
    x = torch.ones(200_000, device=device)
    torch.manual_seed(7)
    first = ops.dropout(x, 0.1, impl="compiled")
    torch.manual_seed(7)
    torch.testing.assert_close(ops.dropout(x, 0.1, impl="compiled"), first, rtol=0, atol=0)
    assert not torch.equal(ops.dropout(x, 0.1, impl="compiled"), first)
    assert (first != 0).double().mean().item() == pytest.approx(0.9, abs=0.005)
    torch.testing.assert_close(first.unique(), torch.tensor([0.0, 1 / 0.9], device=device))


@pytest.mark.parametrize("impl", ["auto", "pytorch"])
def test_identity_outside_training_and_edge_probabilities(impl):
    x = torch.randn(5, 8)
    assert ops.dropout(x, 0.5, training=False, impl=impl) is x
    assert ops.dropout(x, 0.0, impl=impl) is x
    assert torch.equal(ops.dropout(x, 1.0, impl=impl), torch.zeros_like(x))
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            ops.dropout(x, p, impl=impl)


def test_pytorch_impl_is_torch_dropout():
    x = torch.randn(1000)
    torch.manual_seed(1)
    expected = F.dropout(x, 0.2, training=True)
    torch.manual_seed(1)
    torch.testing.assert_close(ops.dropout(x, 0.2, impl="pytorch"), expected, rtol=0, atol=0)


def test_dropout_module_trains_and_evaluates_like_nn_dropout():
    module = Dropout(0.25)
    assert isinstance(module, torch.nn.Dropout) and not list(module.state_dict())
    x = torch.ones(50_000, requires_grad=True)
    out = module(x)
    assert (out == 0).double().mean().item() == pytest.approx(0.25, abs=0.01)
    out.sum().backward()
    torch.testing.assert_close(x.grad, out.detach())  # scaled by 1 / (1 - p) where kept
    assert module.eval()(x) is x


@requires_ops
def test_first_use_check_catches_a_kernel_drawing_another_mask(monkeypatch):
    monkeypatch.setattr(torch.ops.conditional_detr, "dropout", lambda x, p, rng_state: F.dropout(x, p, True))
    assert "output" in self_check.disagreement("dropout", torch.device("cpu"), torch.float32)
