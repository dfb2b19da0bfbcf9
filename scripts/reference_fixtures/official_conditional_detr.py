"""
The fixtures of Atten4Vis/ConditionalDETR: official_r18_tiny{.pth,_args.json,_io.pth} and
the keys of the full-size R50 and R101 models.
"""
import torch

from .common import (
    FOCAL_PRIOR_BIAS, SEED, TINY_OPTIONS, Checkout, detection_io, normal, random_images, random_targets,
    randomize_frozen_batch_norm, round_to_float16, write_keys, write_tiny_fixture,
)

MARKER = "models/conditional_detr.py"
FILES = (
    "official_r18_tiny.pth", "official_r18_tiny_args.json", "official_r18_tiny_io.pth",
    "official_r50_keys.txt", "official_r101_keys.txt",
)


def make(path, progress):
    checkout = Checkout(path)
    tiny(checkout, progress)
    for depth in (50, 101):
        torch.manual_seed(SEED)
        model = checkout.build(["--backbone", f"resnet{depth}", "--device", "cpu"])[0]
        write_keys(progress.path(f"official_r{depth}_keys.txt"), model.state_dict())
        progress.wrote(f"official_r{depth}_keys.txt")


def tiny(checkout, progress):
    torch.manual_seed(SEED)
    model, criterion, postprocessors, args = checkout.build(TINY_OPTIONS + ["--num_queries", "30"])
    generator = torch.Generator().manual_seed(SEED)
    # what the official initialization leaves constant is drawn, so that a wrong mapping shows
    randomize_frozen_batch_norm(model, generator)
    with torch.no_grad():
        model.class_embed.bias.copy_(FOCAL_PRIOR_BIAS + normal(model.class_embed.bias.shape, 1.0, generator))
        last = model.bbox_embed.layers[-1]
        last.weight.copy_(normal(last.weight.shape, 0.02, generator))
    state = round_to_float16(model)

    images = random_images([(301, 457), (389, 318)], generator)
    targets = random_targets([[1, 18, 90], [3]], generator)
    io = detection_io(checkout, model, criterion, postprocessors, images, targets)
    write_tiny_fixture(progress, "official_r18_tiny", state, args, io)
