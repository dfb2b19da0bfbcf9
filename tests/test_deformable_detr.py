"""
Deformable DETR as a detectron2 model: the tiny instant config trains and evaluates end
to end, the optimizer has the official learning-rate groups, single and batched images
agree, images without objects train, and configs that cannot work are refused by name.
"""
import math
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from conditional_detr.engine import get_config
from conditional_detr.solver import build_optimizer

from helpers.paths import DEFORMABLE_INSTANT_CONFIG, QUICK_SCHEDULES
from helpers.tiny import tiny_deformable_cfg
from helpers.training import cli_args, instant_opts, read_metrics
import train_net

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_train_then_evaluate(shapes_root, tmp_path):
    out = tmp_path / "run"
    args = cli_args(*instant_opts(out, "SOLVER.MAX_ITER", 3, "SOLVER.STEPS", "(2,)"))
    args.config_file = DEFORMABLE_INSTANT_CONFIG
    train_net.main(args)
    losses = [r for r in read_metrics(out) if "total_loss" in r]
    assert losses and all(math.isfinite(r["total_loss"]) for r in losses)
    # the two-stage proposals are supervised too
    assert {"loss_ce", "loss_ce_0", "loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses[-1])
    assert any("bbox/AP" in r for r in read_metrics(out))
    assert (out / "model_final.pth").exists()


def test_optimizer_reduces_sampling_offsets_and_reference_points():
    cfg = tiny_deformable_cfg("plain")
    cfg.SOLVER.BASE_LR = 2e-4
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    lr_of = {p: group["lr"] for group in optimizer.param_groups for p in group["params"]}
    reduced = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            expected = 2e-5
        elif "sampling_offsets" in name or "reference_points" in name:
            expected = 2e-5
            reduced.append(name)
        else:
            expected = 2e-4
        assert lr_of[p] == pytest.approx(expected), name
    # weight and bias of each layer's offsets, and of the reference-point projection
    assert len(reduced) == 2 * (2 + 3) + 2


def random_inputs(num_images, with_objects=True):
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for i in range(num_images):
        h, w = 64 + 8 * i, 72 + 8 * i
        image = torch.randint(0, 255, (3, h, w), generator=generator, dtype=torch.uint8)
        instances = Instances((h, w))
        count = 2 if with_objects else 0
        instances.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]])[:count])
        instances.gt_classes = torch.tensor([1, 3])[:count]
        inputs.append({"image": image, "instances": instances})
    return inputs


@pytest.mark.parametrize("variant", ["plain", "refine", "two_stage"])
def test_single_image_equals_its_row_of_a_batch(variant):
    torch.manual_seed(0)
    model = build_model(tiny_deformable_cfg(variant)).eval()
    inputs = random_inputs(2)
    with torch.no_grad():
        batched = model(inputs)
        # the largest image pads nothing in the batch: alone it gives the same detections
        alone = model([inputs[1]])
    torch.testing.assert_close(batched[1]["instances"].scores, alone[0]["instances"].scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        batched[1]["instances"].pred_boxes.tensor, alone[0]["instances"].pred_boxes.tensor, atol=1e-4, rtol=0
    )


def test_images_without_objects_train():
    torch.manual_seed(0)
    model = build_model(tiny_deformable_cfg("two_stage")).train()
    losses = model(random_inputs(2, with_objects=False))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE": False}, "TWO_STAGE needs MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE"),
        ({"MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS": 2}, "NUM_FEATURE_LEVELS is 2"),
        ({"MODEL.DETR.CLASS_LOSS": "softmax"}, "CLASS_LOSS must be 'focal'"),
        ({"MODEL.DETR.HIDDEN_DIM": 48}, "HIDDEN_DIM must be a multiple of 32, got 48"),
        ({"MODEL.DEFORMABLE_DETR.DEC_N_POINTS": 0}, "DEC_N_POINTS must be positive, got 0"),
        ({"TEST.AMP.ENABLED": True, "TEST.AMP.PRECISION": "fp8"}, "TEST.AMP.PRECISION must be one of"),
    ],
)
def test_configs_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model(tiny_deformable_cfg("two_stage", **overrides))


def test_shapes_config_builds_four_levels():
    cfg = get_config(os.path.join(QUICK_SCHEDULES, "deformable_detr_shapes.yaml"), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    assert len(model.input_proj) == 4 and model.feature_names == ["res3", "res4", "res5"]


@pytest.mark.parametrize("variant", ["plain", "two_stage"])
def test_bfloat16_inference_is_close_to_float32(variant):
    inputs = [{"image": x["image"]} for x in random_inputs(2)]
    detections = {}
    for amp in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_deformable_cfg(variant, **{"TEST.AMP.ENABLED": amp})).eval()
        dtypes = []
        model.backbone.register_forward_hook(lambda m, a, out: dtypes.append(next(iter(out.values())).dtype))
        with torch.no_grad():
            detections[amp] = model(inputs)
        assert dtypes == [torch.bfloat16 if amp else torch.float32]
    # without TEST.AMP, a caller's own autocast stays in force
    dtypes.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model = build_model(tiny_deformable_cfg(variant)).eval()
        model.backbone.register_forward_hook(lambda m, a, out: dtypes.append(next(iter(out.values())).dtype))
        model(inputs)
    assert dtypes == [torch.bfloat16]
    for fp32, bf16 in zip(detections[False], detections[True]):
        assert bf16["instances"].scores.dtype == torch.float32
        # bf16 keeps 8 bits of mantissa: the best scores agree to a few hundredths
        torch.testing.assert_close(bf16["instances"].scores[:5], fp32["instances"].scores[:5], atol=0.05, rtol=0)
