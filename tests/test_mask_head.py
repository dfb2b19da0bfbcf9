"""
DETR's mask head (MODEL.MASK_ON) and what it reads from the detectors: the encoder's memory
beside the decoder's outputs, and the backbone's finer stages with their padding masks.
"""
import json

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import PolygonMasks

from conditional_detr.engine import get_config
from conditional_detr.modeling.backbone import build_resnet_like_torchvision, features_with_padding_masks
from conditional_detr.modeling.mask_head import AttentionMap

from helpers.paths import INSTANT_CONFIG
from helpers.tiny import HIDDEN_DIM, tiny_batch, tiny_deformable_cfg, tiny_model

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


ARCHITECTURES = ("DETR", "ConditionalDETR", "DeformableDETR")


def masked_model(architecture="DETR", **overrides):
    """A tiny model of `architecture` with the mask head, at widths its GroupNorms take."""
    if architecture == "DeformableDETR":
        torch.manual_seed(0)
        cfg = tiny_deformable_cfg("two_stage", **{
            "MODEL.MASK_ON": True, "MODEL.DETR.HIDDEN_DIM": 128, "MODEL.DETR.NHEADS": 8,
            **{k if "." in k else f"MODEL.DETR.{k}": v for k, v in overrides.items()},
        })
        return build_model(cfg)
    detr = {"MODEL.META_ARCHITECTURE": "DETR", "CLASS_LOSS": "softmax"} if architecture == "DETR" else {}
    return tiny_model(**{
        **detr, "MODEL.MASK_ON": True, "MODEL.RESNETS.OUT_FEATURES": "['res5']", "HIDDEN_DIM": 128, "NHEADS": 8,
        **overrides,
    })


def masked_detr(**overrides):
    return masked_model("DETR", **overrides)


def with_polygon_masks(batch):
    """Each instance's mask as the polygon of its box, as a COCO dataset's annotations give them."""
    for x in batch:
        instances = x["instances"]
        instances.gt_masks = PolygonMasks([
            [[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in instances.gt_boxes.tensor.tolist()
        ])
    return batch


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_head_trains_with_the_mask_losses_and_reaches_every_parameter(architecture):
    model = masked_model(architecture).train()
    losses = model(with_polygon_masks(tiny_batch()))  # one image with two instances, one with none
    assert {"loss_mask", "loss_dice"} < set(losses) and "loss_mask_0" not in losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, parameter in [*model.bbox_attention.named_parameters(), *model.mask_head.named_parameters()]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_images_without_instances_train(architecture):
    model = masked_model(architecture).train()
    batch = with_polygon_masks(tiny_batch())
    batch[0]["instances"] = batch[0]["instances"][:0]
    losses = model(batch)
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0
    sum(losses.values()).backward()
    assert model.mask_head.out_lay.weight.grad is not None


def test_the_attention_map_normalizes_over_heads_and_positions_jointly():
    attention = AttentionMap(32, 32, 4)
    generator = torch.Generator().manual_seed(0)
    queries, feature_map = torch.randn(2, 5, 32, generator=generator), torch.randn(2, 32, 3, 4, generator=generator)
    padding = torch.zeros(2, 3, 4, dtype=torch.bool)
    padding[1, :, 3] = True
    weights = attention(queries, feature_map, padding)
    assert weights.shape == (2, 5, 4, 3, 4)
    torch.testing.assert_close(weights.flatten(2).sum(-1), torch.ones(2, 5))
    assert (weights[1, :, :, :, 3] == 0).all() and (weights[0] > 0).all()
    # not per head: a head's weights alone do not sum to 1
    assert not torch.allclose(weights[0, 0, 0].sum(), torch.tensor(1.0))


def test_inference_outputs_stride_4_mask_logits_of_every_query():
    model = masked_detr().eval()
    images = two_images(model)
    with torch.no_grad():
        outputs = model.forward_outputs(images)
    assert outputs["pred_masks"].shape == (2, model.num_queries, 64 // 4, 128 // 4)


def test_bad_widths_and_features_are_named():
    with pytest.raises(ValueError, match="HIDDEN_DIM a multiple of 128"):
        masked_detr(HIDDEN_DIM=64, NHEADS=4)
    with pytest.raises(ValueError, match=r"the transformer reads res3; set MODEL.RESNETS.OUT_FEATURES \['res5'\] or"):
        masked_detr(**{"MODEL.RESNETS.OUT_FEATURES": "['res3']"})


@pytest.mark.parametrize("architecture", ["DETR", "ConditionalDETR"])
def test_a_stride_16_memory_gives_stride_4_masks_too(architecture):
    """The transformer on res4 (as the shapes configs): the head's first upsampling keeps res4's size."""
    model = masked_model(architecture, **{"MODEL.RESNETS.OUT_FEATURES": "['res4']"}).eval()
    images = two_images(model)
    with torch.no_grad():
        outputs = model.forward_outputs(images)
    assert outputs["pred_masks"].shape == (2, model.num_queries, 64 // 4, 128 // 4)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_matched_queries_alone_give_the_losses_and_gradients_of_every_query(architecture):
    batch = with_polygon_masks(tiny_batch())
    lazy, full = masked_model(architecture).train(), masked_model(architecture).train()
    full.load_state_dict(lazy.state_dict())
    lazy_losses = lazy(batch)
    images = full.preprocess_image(batch)
    outputs = full.forward_outputs(images)  # "pred_masks" of every query, as the official model
    assert "pred_masks" in outputs and "mask_predictor" not in outputs
    full_losses = full.criterion(outputs, full.prepare_targets(batch, images.image_sizes))
    for name in ("loss_mask", "loss_dice"):
        torch.testing.assert_close(lazy_losses[name], full_losses[name] * full.criterion.weight_dict[name])
    (lazy_losses["loss_mask"] + lazy_losses["loss_dice"]).backward()
    (full_losses["loss_mask"] + full_losses["loss_dice"]).backward()
    for (name, a), b in zip(lazy.mask_head.named_parameters(), full.mask_head.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_inference_gives_full_image_masks_of_each_detection_and_a_batch_changes_none(architecture):
    model = masked_model(architecture, **{"TEST.DETECTIONS_PER_IMAGE": 5}).eval()
    generator = torch.Generator().manual_seed(0)
    first = {"image": torch.rand(3, 64, 96, generator=generator) * 255, "height": 128, "width": 192}
    # of the same size: no padding, which changes a DETR's features at the image's edge, official or not
    second = {"image": torch.rand(3, 64, 96, generator=generator) * 255}
    with torch.no_grad():
        alone = model([first])[0]["instances"]
        batched = model([first, second])
    assert alone.pred_masks.shape == (len(alone), 128, 192) and alone.pred_masks.dtype == torch.bool
    assert batched[1]["instances"].pred_masks.shape[1:] == (64, 96)
    # another image in the batch changes neither the detections nor their masks
    together = batched[0]["instances"]
    torch.testing.assert_close(together.scores, alone.scores, atol=1e-4, rtol=0)
    assert (together.pred_masks != alone.pred_masks).float().mean() < 1e-3
    assert not alone.has("query_index")


INSTANT_MASK_OPTS = (
    "MODEL.MASK_ON", True, "INPUT.MASK_FORMAT", "bitmask", "MODEL.RESNETS.OUT_FEATURES", "['res5']",
    "MODEL.DETR.HIDDEN_DIM", 128, "MODEL.DETR.NHEADS", 8, "SOLVER.MAX_ITER", 3, "SOLVER.STEPS", "(2,)",
)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_detector_trains_its_head_on_the_shapes_masks_and_evaluates_segm_ap(shapes_root, tmp_path, architecture):
    import train_net

    from helpers.paths import DEFORMABLE_INSTANT_CONFIG
    from helpers.training import cli_args, instant_opts, read_metrics

    config = DEFORMABLE_INSTANT_CONFIG if architecture == "DeformableDETR" else INSTANT_CONFIG
    opts = list(INSTANT_MASK_OPTS)
    if architecture == "DeformableDETR":
        opts[opts.index("MODEL.RESNETS.OUT_FEATURES") + 1] = "['res3', 'res4', 'res5']"
    if architecture == "DETR":
        opts += ["MODEL.META_ARCHITECTURE", "DETR", "MODEL.DETR.CLASS_LOSS", "softmax"]
    out = tmp_path / "run"
    train_net.main(cli_args(*instant_opts(out, *opts), config_file=config))
    records = read_metrics(out)
    losses = [r for r in records if "total_loss" in r]
    assert losses and {"loss_mask", "loss_dice"} <= set(losses[-1])
    # COCOEvaluator's segm task on the dataset's RLE masks, after training
    evaluation = next(r for r in records if "segm/AP" in r)
    assert 0 <= evaluation["segm/AP"] <= 100 and 0 <= evaluation["bbox/AP"] <= 100
    results = json.load(open(out / "inference" / "coco_instances_results.json"))
    assert results and all("segmentation" in r for r in results)


@pytest.mark.parametrize(
    "annotation, refused",
    [
        ({"bbox": [0, 0, 4, 4], "category_id": 0}, r"MODEL.MASK_ON, but 1 of the 2 annotations of DATASETS.TRAIN "
         r"\('mask_check'\) carry no mask \('segmentation'\), the first of image 'b.png'"),
        ({"bbox": [0, 0, 4, 4], "category_id": 0, "segmentation": {"size": [8, 8], "counts": "0"}},
         r"DATASETS.TRAIN \('mask_check'\) has RLE masks \(image 'b.png'\), which INPUT.MASK_FORMAT 'polygon'"),
        ({"bbox": [0, 0, 4, 4], "category_id": 0, "segmentation": [[0, 0, 4, 0, 0, 4]]}, None),
    ],
    ids=["no mask", "rle for polygons", "polygons"],
)
def test_masks_are_checked_before_training_on_the_loader_s_one_read(annotation, refused):
    from detectron2.data import DatasetCatalog

    from conditional_detr.engine import Trainer

    polygon = {"bbox": [0, 0, 4, 4], "category_id": 0, "segmentation": [[0, 0, 4, 0, 4, 4]]}
    reads = []

    def records():
        reads.append(1)
        return [{"file_name": name, "image_id": i, "height": 8, "width": 8, "annotations": [a]}
                for i, (name, a) in enumerate([("a.png", polygon), ("b.png", annotation)])]

    DatasetCatalog.register("mask_check", records)
    try:
        cfg = get_config(opts=["MODEL.MASK_ON", True, "INPUT.MASK_FORMAT", "polygon", "DATASETS.TRAIN", ("mask_check",),
                               "MODEL.DETR.NUM_CLASSES", 1])
        if refused is None:
            Trainer.build_train_loader(cfg)
        else:
            with pytest.raises(ValueError, match=refused):
                Trainer.build_train_loader(cfg)
        assert len(reads) == 1
    finally:
        DatasetCatalog.remove("mask_check")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_papers_recipe_freezes_the_detector_and_trains_the_head_from_a_detection_checkpoint(
    architecture, tmp_path, caplog
):
    import logging

    from conditional_detr.checkpoint import ConditionalDETRCheckpointer

    detector = masked_model(architecture, **{"MODEL.MASK_ON": False})
    ConditionalDETRCheckpointer(detector, str(tmp_path)).save("detector")
    model = masked_model(architecture, TRAIN_MASK_HEAD_ONLY=True).train()
    head = {id(p) for p in [*model.bbox_attention.parameters(), *model.mask_head.parameters()]}
    assert all(p.requires_grad == (id(p) in head) for p in model.parameters())
    initial_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("bbox_attention", "mask_head"))}
    with caplog.at_level(logging.INFO):
        ConditionalDETRCheckpointer(model).load(str(tmp_path / "detector.pth"))
    assert "a detector's checkpoint, without the mask head: the mask head (bbox_attention, mask_head) starts from its initialization" in caplog.text
    for key, value in detector.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(torch.equal(model.state_dict()[k], v) for k, v in initial_head.items())
    sum(model(with_polygon_masks(tiny_batch())).values()).backward()
    assert all((p.grad is not None) == (id(p) in head) for p in model.parameters())
    with pytest.raises(ValueError, match="TRAIN_MASK_HEAD_ONLY trains the mask head alone: it needs MODEL.MASK_ON True"):
        masked_model(architecture, TRAIN_MASK_HEAD_ONLY=True, **{"MODEL.MASK_ON": False})


def test_an_official_detection_checkpoint_loads_into_a_model_with_the_head(tmp_path):
    from helpers.official import reference_file, tiny_detr_fixture_cfg

    from conditional_detr.checkpoint import ConditionalDETRCheckpointer

    cfg = tiny_detr_fixture_cfg()
    cfg.MODEL.MASK_ON = True
    model = build_model(cfg)
    ConditionalDETRCheckpointer(model).load(str(reference_file("official_detr_r18_tiny.pth")))  # no error: the head is new


@pytest.mark.slow
def test_the_cost_benchmark_measures_the_head_side_by_side(tmp_path):
    from conditional_detr.tools import benchmark_mask_head

    path = tmp_path / "cost.json"
    results = benchmark_mask_head.main(["--image-size", "96", "128", "--detectors", "DETR", "--json", str(path)])
    row = results["DETR"]
    assert row["head_parameters"] == 1_333_657  # the official head's, for ResNet-50 and 8 heads
    assert row["head_gflops_every_query"] > 0
    assert row["peak_train_MiB_head_every_query"] > row["peak_train_MiB_head_matched_queries"]
    assert json.loads(path.read_text())["speedups"]["every_query_peak_over_matched_queries_peak"]["DETR"] > 1


def test_panoptic_inference_runs_the_head_once_per_image_for_both_outputs():
    """The instances' queries and the panoptic segments' overlap: each query's mask is computed once."""
    model = masked_detr(PANOPTIC_ON=True, PANOPTIC_THRESHOLD=0.0).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.rand(3, 64, 96, generator=generator) * 255} for _ in range(2)]
    runs = []
    model.mask_head.register_forward_hook(lambda module, args, out: runs.append(out.shape[0]))
    with torch.no_grad():
        outputs = model(inputs)
    assert len(runs) == 2  # one per image
    assert all(0 < n <= model.num_queries for n in runs)  # each query once
    assert outputs[0]["panoptic_seg"][1] and outputs[0]["instances"].pred_masks.shape[0] == len(outputs[0]["instances"])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_panoptic_segmentation_in_detectron2s_format(architecture):
    # a random model's scores are low: every query kept, as a trained one keeps its confident ones
    model = masked_model(architecture, PANOPTIC_ON=True, PANOPTIC_THRESHOLD=0.0).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.rand(3, 64, 96, generator=generator) * 255, "height": 96, "width": 144}]
    with torch.no_grad():
        output = model(inputs)[0]
    segment_ids, segments = output["panoptic_seg"]
    assert segment_ids.shape == (96, 144) and segment_ids.dtype == torch.int32
    assert segments and [s["id"] for s in segments] == list(range(1, len(segments) + 1))
    for segment in segments:
        assert segment["area"] == (segment_ids == segment["id"]).sum() > model.panoptic_min_area
        assert 0 <= segment["category_id"] < model.num_classes and 0 < segment["score"] <= 1
        assert segment["isthing"]  # a dataset without stuff: every class a thing
    assert "instances" in output


def test_panoptic_needs_the_mask_head():
    with pytest.raises(ValueError, match="PANOPTIC_ON segments with the mask head: it needs MODEL.MASK_ON True"):
        masked_detr(PANOPTIC_ON=True, **{"MODEL.MASK_ON": False})


@pytest.mark.slow
@pytest.mark.parametrize("architecture", [*ARCHITECTURES, "DETR-DC5"])
def test_each_detector_trains_and_evaluates_panoptic_segmentation_on_the_shapes(shapes_root, tmp_path, architecture):
    """The instant variants of configs/COCO-PanopticSegmentation: each detector, and DETR's dilated res5."""
    import train_net

    from helpers.paths import DEFORMABLE_INSTANT_CONFIG
    from helpers.training import PANOPTIC_NUM_CLASSES, cli_args, instant_opts, read_metrics

    config = DEFORMABLE_INSTANT_CONFIG if architecture == "DeformableDETR" else INSTANT_CONFIG
    opts = list(INSTANT_MASK_OPTS) + [
        "MODEL.DETR.NUM_CLASSES", PANOPTIC_NUM_CLASSES, "MODEL.DETR.PANOPTIC_ON", True, "MODEL.DETR.PANOPTIC_THRESHOLD", 0.0,
        "DATASETS.TRAIN", "('shapes_panoptic_train',)", "DATASETS.TEST", "('shapes_panoptic_val',)",
    ]
    if architecture == "DeformableDETR":
        opts[opts.index("MODEL.RESNETS.OUT_FEATURES") + 1] = "['res3', 'res4', 'res5']"
    if architecture.startswith("DETR"):
        opts += ["MODEL.META_ARCHITECTURE", "DETR", "MODEL.DETR.CLASS_LOSS", "softmax"]
    if architecture == "DETR-DC5":  # detectron2 dilates bottleneck blocks only
        opts += ["MODEL.RESNETS.RES5_DILATION", 2, "MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.RES2_OUT_CHANNELS", 256]
    out = tmp_path / "run"
    train_net.main(cli_args(*instant_opts(out, *opts), config_file=config))
    records = read_metrics(out)
    assert {"loss_mask", "loss_dice"} <= set(next(r for r in records if "total_loss" in r))
    evaluation = next(r for r in records if "panoptic_seg/PQ" in r)
    assert {"panoptic_seg/PQ_th", "panoptic_seg/PQ_st", "segm/AP", "bbox/AP"} <= set(evaluation)
    assert 0 <= evaluation["panoptic_seg/PQ"] <= 100
