"""
MODEL.BACKBONE.COMPILE_FOR_INFERENCE: inference through the backbone compiled with frozen
weights gives the eager outputs, follows new weights (loaded or changed in place, however
often), and training stays eager.
"""
import copy

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from conditional_detr.config import get_config

from helpers.paths import DEFORMABLE_INSTANT_CONFIG, INSTANT_CONFIG

pytestmark = pytest.mark.slow  # inductor compiles the backbone (seconds)


def build(config, compile_for_inference):
    torch.manual_seed(0)
    opts = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.COMPILE_FOR_INFERENCE", str(compile_for_inference)]
    return build_model(get_config(config, opts)).eval()


def detect(model, inputs):
    with torch.no_grad():
        return model(inputs)[0]["instances"]


def assert_same(a, b):
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-3, rtol=0)


@pytest.mark.parametrize("config", [INSTANT_CONFIG, DEFORMABLE_INSTANT_CONFIG], ids=["conditional", "deformable"])
def test_compiled_inference_gives_the_eager_detections_and_follows_new_weights(config):
    compiled, eager = build(config, True), build(config, False)
    inputs = [{"image": torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)}]
    assert_same(detect(compiled, inputs), detect(eager, inputs))
    assert compiled.backbone_compiler.compiled is not None

    # weights changed in place, as an average of the weights is between evaluations: followed
    with torch.no_grad():
        for model in (compiled, eager):
            for p in model.backbone.parameters():
                p.mul_(0.9)
    assert_same(detect(compiled, inputs), detect(eager, inputs))

    # new weights: the frozen ones are forgotten, the next inference compiles the new ones
    state = {k: v + 0.05 * torch.randn_like(v) if k.startswith("backbone.") and v.is_floating_point() else v
             for k, v in eager.state_dict().items()}
    compiled.load_state_dict(state)
    eager.load_state_dict(state)
    assert compiled.backbone_compiler.compiled is None
    assert_same(detect(compiled, inputs), detect(eager, inputs))


def test_training_and_inference_with_autograd_run_the_backbone_eagerly():
    model = build(INSTANT_CONFIG, True)
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    with torch.enable_grad():
        model([{"image": image}])  # eval mode, autograd on: eager
    assert model.backbone_compiler.compiled is None
    model.train()
    instances = Instances((64, 80), gt_boxes=Boxes(torch.tensor([[4.0, 4.0, 40.0, 30.0]])), gt_classes=torch.tensor([1]))
    losses = model([{"image": image, "instances": instances}])
    sum(losses.values()).backward()
    assert model.backbone_compiler.compiled is None
    # a copy (the benchmark's training models) compiles its own weights
    assert copy.deepcopy(model).backbone_compiler is not model.backbone_compiler


def test_weights_changed_more_often_than_torch_compile_keeps_code_for_are_still_compiled():
    from torch._dynamo.utils import counters

    model = build(INSTANT_CONFIG, True)
    inputs = [{"image": torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)}]
    limit = torch._dynamo.config.recompile_limit  # code kept per code object, then eager
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(limit + 1):
        with torch.no_grad():
            next(model.backbone.parameters()).mul_(0.99)
        detect(model, inputs)
    assert counters["stats"]["unique_graphs"] - graphs == limit + 1
