"""
DETR's mask head (MODEL.MASK_ON) and what it reads from the detectors: the encoder's memory
beside the decoder's outputs, and the backbone's finer stages with their padding masks.
"""
import pytest
import torch

from conditional_detr.engine import get_config
from conditional_detr.modeling.backbone import build_resnet_like_torchvision, features_with_padding_masks

from helpers.tiny import HIDDEN_DIM, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def two_images(model):
    """A batch of a 64x128 and a 64x40 image: the second's right side is padding at every stride."""
    generator = torch.Generator().manual_seed(0)
    sizes = ((64, 128), (64, 40))
    return model.preprocess_image([{"image": torch.rand(3, h, w, generator=generator) * 255} for h, w in sizes])


def test_the_transformer_returns_its_memory_beside_the_decoder_outputs():
    model = tiny_model().eval()
    with torch.no_grad():
        images = two_images(model)
        features, mask = features_with_padding_masks(model.backbone, images)[model.feature_name]
        out = model.transformer(model.input_proj(features), mask, model.query_embed.weight, model.position_embedding(mask))
        memory = model.transformer.encoder(
            model.input_proj(features).flatten(2).permute(2, 0, 1), mask.flatten(1),
            model.position_embedding(mask).flatten(2).permute(2, 0, 1),
        )
    height, width = features.shape[-2:]
    assert out["spatial_shapes"].tolist() == [[height, width]] and out["level_start_index"].tolist() == [0]
    assert out["memory"].shape == (2, height * width, HIDDEN_DIM)
    torch.testing.assert_close(out["memory"], memory.transpose(0, 1))
    assert torch.equal(out["memory_padding_mask"], mask.flatten(1))
    assert out["memory_padding_mask"].any()  # the batch's images differ in size


def test_the_backbone_returns_the_finer_stages_with_their_padding_masks():
    cfg = get_config(opts=[
        "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.RESNETS.OUT_FEATURES", "['res5']",
    ])
    plain, names = build_resnet_like_torchvision(cfg)
    extended, extended_names = build_resnet_like_torchvision(cfg, extra_features=("res2", "res3", "res4"))
    assert names == extended_names == ["res5"]
    assert cfg.MODEL.RESNETS.OUT_FEATURES == ["res5"]  # the config is left as it is
    assert plain.state_dict().keys() == extended.state_dict().keys()  # the same network
    extended.load_state_dict(plain.state_dict())
    images = two_images(tiny_model())
    with torch.no_grad():
        features = features_with_padding_masks(extended, images)
        expected = plain(images.tensor)["res5"]
    assert list(features) == ["res2", "res3", "res4", "res5"]
    torch.testing.assert_close(features["res5"][0], expected)
    for name, stride in (("res2", 4), ("res3", 8), ("res4", 16), ("res5", 32)):
        feature, mask = features[name]
        assert mask.shape == (2, *feature.shape[-2:])
        # the second image is padded to the batch's 64x128: its right columns are padding
        assert mask[1, :, -1].all() and not mask[1, :, 0].any() and not mask[0].any()
