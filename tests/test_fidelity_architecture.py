"""
Full-size models have the official keys, shapes and parameter counts, and
detectron2's ResNet computes what the official torchvision ResNet computes,
DC5 included.
"""
import pytest
import torch
import torchvision
from detectron2.modeling import build_model
from torchvision.ops.misc import FrozenBatchNorm2d

from conditional_detr.checkpoint.official import OFFICIAL_BACKBONE_PREFIX, convert_state_dict

from helpers.official import official_keys, resnet_cfg

OFFICIAL_PARAMETERS = {50: 43_418_401, 101: 62_358_305}
COCO_ID_CLASS_HEAD_EXTRA = 11 * 257  # 91 - 80 logits, each with 256 weights and a bias


def parameter_count(model):
    # the official figure counts every parameter, the frozen stem and res2 included
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth", [50, 101])
@pytest.mark.parametrize("num_classes", [91, 80])
def test_parameter_count(depth, num_classes):
    model = build_model(resnet_cfg(depth, num_classes))
    expected = OFFICIAL_PARAMETERS[depth] - (COCO_ID_CLASS_HEAD_EXTRA if num_classes == 80 else 0)
    assert parameter_count(model) == expected


@pytest.mark.parametrize("depth,dilation", [(50, 1), (50, 2), (101, 1), (101, 2)])
def test_converted_official_keys_and_shapes_match(depth, dilation):
    shapes = official_keys(f"official_r{depth}_keys.txt")
    fake_official = {k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}
    converted = convert_state_dict(fake_official, num_classes=80)
    model_state = build_model(resnet_cfg(depth, 80, dilation)).state_dict()
    assert set(converted) == set(model_state)
    for key, value in converted.items():
        assert value.shape == model_state[key].shape, key


def random_torchvision_resnet(depth, dilation):
    torch.manual_seed(depth + dilation)
    resnet = getattr(torchvision.models, f"resnet{depth}")(
        weights=None, norm_layer=FrozenBatchNorm2d,
        replace_stride_with_dilation=[False, False, dilation > 1],
    )
    # random frozen statistics so that a mis-mapped norm cannot go unnoticed
    for module in resnet.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.2, 0.2)
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return resnet.eval()


@pytest.mark.parametrize("depth,dilation", [(18, 1), (34, 1), (50, 1), (50, 2), (101, 2)])
def test_backbone_equals_torchvision_resnet(depth, dilation):
    resnet = random_torchvision_resnet(depth, dilation)
    state = {
        OFFICIAL_BACKBONE_PREFIX + k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")
    }
    # the converter needs a class head to be present
    state["class_embed.weight"], state["class_embed.bias"] = torch.zeros(91, 256), torch.zeros(91)
    converted = {
        k[len("backbone."):]: v for k, v in convert_state_dict(state, 91).items() if k.startswith("backbone.")
    }
    model = build_model(resnet_cfg(depth, 91, dilation)).eval()
    model.backbone.load_state_dict(converted, strict=True)

    image = torch.randn(1, 3, 97, 130)
    body = torch.nn.Sequential(*list(resnet.children())[:-2])
    with torch.no_grad():
        expected = body(image)
        ours = model.backbone(image)[model.feature_name]
    # float32 rounding grows through deep random networks: compare to the output's scale
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max()
