"""
The fixtures of facebookresearch/detr: the DETR baseline (official_detr_r18_tiny*, the R50
keys) and DETR with its mask head on COCO panoptic (official_detr_panoptic_r18_tiny*, the
R50 panoptic keys).
"""
import io

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from PIL import Image

from conditional_detr.tools.official_checkout import import_official

from .common import (
    SEED, TINY_OPTIONS, Checkout, detached, detection_io, image_sizes, normal, random_images,
    random_targets, randomize_frozen_batch_norm, round_to_float16, weighted_terms, write_keys,
    write_tiny_fixture,
)

MARKER = "models/detr.py"
FILES = (
    "official_detr_r18_tiny.pth", "official_detr_r18_tiny_args.json", "official_detr_r18_tiny_io.pth",
    "official_detr_r50_keys.txt",
    "official_detr_panoptic_r18_tiny.pth", "official_detr_panoptic_r18_tiny_args.json",
    "official_detr_panoptic_r18_tiny_io.pth", "official_detr_panoptic_r50_keys.txt",
)
TINY_DETR = TINY_OPTIONS + ["--num_queries", "20"]
PANOPTIC = ["--masks", "--dataset_file", "coco_panoptic"]
IMAGE_SIZES = [(333, 401), (290, 487)]
PANOPTIC_IDS = [c["id"] for c in COCO_CATEGORIES]  # the 133 categories among ids 1..200
STUFF_IDS = [c["id"] for c in COCO_CATEGORIES if not c["isthing"]]
THING_IDS = [c["id"] for c in COCO_CATEGORIES if c["isthing"]]


def make(path, progress):
    checkout = Checkout(path)
    tiny(checkout, progress)
    tiny_panoptic(checkout, progress)
    for name, options in (("official_detr_r50_keys.txt", []), ("official_detr_panoptic_r50_keys.txt", PANOPTIC)):
        torch.manual_seed(SEED)
        write_keys(progress.path(name), checkout.build(options + ["--device", "cpu"])[0].state_dict())
        progress.wrote(name)


def tiny(checkout, progress):
    torch.manual_seed(SEED)
    model, criterion, postprocessors, args = checkout.build(TINY_DETR)
    generator = torch.Generator().manual_seed(SEED)
    randomize_frozen_batch_norm(model, generator)
    with torch.no_grad():
        model.class_embed.bias.copy_(normal(model.class_embed.bias.shape, 1.0, generator))
    state = round_to_float16(model)

    images = random_images(IMAGE_SIZES, generator)
    targets = random_targets([[1, 44, 90], [17]], generator)
    io_ = detection_io(checkout, model, criterion, postprocessors, images, targets)
    write_tiny_fixture(progress, "official_detr_r18_tiny", state, args, io_)


def tiny_panoptic(checkout, progress):
    segmentation, = import_official(checkout.path, "models.segmentation")
    torch.manual_seed(SEED)
    model, criterion, postprocessors, args = checkout.build(TINY_DETR + PANOPTIC)
    # the official head is built for ResNet-50's res4, res3, res2 channels: only those change
    hidden, heads = model.detr.transformer.d_model, model.detr.transformer.nhead
    model.mask_head = segmentation.MaskHeadSmallConv(hidden + heads, [256, 128, 64], hidden)
    generator = torch.Generator().manual_seed(SEED)
    randomize_frozen_batch_norm(model, generator)
    with torch.no_grad():
        head = model.detr.class_embed
        head.weight.copy_(normal(head.weight.shape, 0.5, generator))  # peaked scores
        bias = normal(head.bias.shape, 1.0, generator)
        unused = torch.ones(len(bias) - 1, dtype=torch.bool)
        unused[PANOPTIC_IDS] = False
        bias[:-1][unused] = -30.0  # ids without a category: a trained model never predicts them
        head.bias.copy_(bias)
    state = round_to_float16(model)

    images = random_images(IMAGE_SIZES, generator)
    sizes = image_sizes(images)
    targets = random_targets([[1, 44, 184], [17]], generator, image_sizes=IMAGE_SIZES)
    model.eval()
    with torch.no_grad():
        raw = detached(model(checkout.samples(images)))
        model.train()  # the losses in train mode, as the official training computes them (dropout 0)
        losses = weighted_terms(criterion, criterion(detached(model(checkout.samples(images))), targets))
    crafted = crafted_outputs(raw, generator)
    segm = postprocessors["segm"](postprocessors["bbox"](crafted, sizes), crafted, sizes, sizes)
    io_ = {
        "images_uint8_rgb": images,
        "raw": {k: raw[k] for k in ("pred_logits", "pred_boxes", "pred_masks")},
        "crafted": crafted,
        "panoptic": [decoded(p) for p in postprocessors["panoptic"](crafted, sizes, sizes)],
        "segm": [{k: r[k] for k in ("scores", "labels", "boxes", "masks")} for r in segm],
        "targets_coco_ids": targets,
        "losses": losses,
        "weight_dict": dict(criterion.weight_dict),
    }
    write_tiny_fixture(progress, "official_detr_panoptic_r18_tiny", state, args, io_)


def crafted_outputs(raw, generator):
    """
    Outputs for the post-processing, which random weights cannot give (every query the same
    class): half of the queries peaked on a panoptic id, four of them on one stuff id (one
    segment once merged), two under the 0.85 threshold, then things, then any category; the
    rest "no object".
    Masks are smooth random fields at the raw masks' size; boxes the raw ones.
    """
    batch, queries, logits_count = raw["pred_logits"].shape
    logits = normal((batch, queries, logits_count), 1.0, generator)
    logits[..., -1] = 12.0  # "no object" unless peaked below
    for image in range(batch):
        picked = torch.randperm(queries, generator=generator)[: queries // 2]
        merged_stuff = STUFF_IDS[int(torch.randint(len(STUFF_IDS), (1,), generator=generator))]
        for rank, query in enumerate(picked.tolist()):
            # after the merged stuff and the two under the threshold, things, then any category
            choices = [merged_stuff] if rank < 4 else THING_IDS if rank < 8 else PANOPTIC_IDS
            label = choices[int(torch.randint(len(choices), (1,), generator=generator))]
            logits[image, query, -1] = 0.0
            logits[image, query, label] = 1.5 if rank in (4, 5) else 14.0  # two under the threshold
    fields = normal((batch, queries, 6, 8), 3.0, generator)
    masks = F.interpolate(fields, size=raw["pred_masks"].shape[-2:], mode="bicubic", align_corners=False)
    return {"pred_logits": logits, "pred_masks": masks, "pred_boxes": raw["pred_boxes"].clone()}


def decoded(panoptic):
    """The official PNG decoded to segment ids (R + 256 G + 256^2 B), with its segments."""
    rgb = np.asarray(Image.open(io.BytesIO(panoptic["png_string"])), dtype=np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    return {"segment_ids": torch.from_numpy(ids), "segments_info": panoptic["segments_info"]}

