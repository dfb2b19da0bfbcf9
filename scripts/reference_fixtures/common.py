"""
What the fixtures of the three official repositories share: the official model built from
its own argument parser, seeded inputs and re-initializations, float16 rounding, and the
files' formats (see the reference README: checkpoint, *_args.json, *_io.pth, *_keys.txt).
"""
import json
import math
import time

import torch

from conditional_detr.tools.official_checkout import import_official

# the official main.py's default --seed; every fixture starts from it
SEED = 42
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the small models of the fixtures: ResNet-18, 2 encoder and 3 decoder layers, FFN 512, no dropout
TINY_OPTIONS = [
    "--backbone", "resnet18", "--enc_layers", "2", "--dec_layers", "3", "--dim_feedforward", "512",
    "--dropout", "0.0", "--device", "cpu",
]


class Checkout:
    """An official repository's checkout: its argument parser, model builder and helpers."""

    def __init__(self, path):
        self.path = path
        self.main, self.backbone, self.models, self.misc = import_official(
            path, "main", "models.backbone", "models", "util.misc"
        )
        # random weights: no ImageNet download (torchvision's pretrained=is_main_process())
        self.backbone.is_main_process = lambda: False

    def build(self, options):
        """(model, criterion, postprocessors, args) of the official build_model for `options`."""
        args = self.main.get_args_parser().parse_args(options)
        model, criterion, postprocessors = self.models.build_model(args)
        return model, criterion, postprocessors, args

    def samples(self, images):
        """The official input: normalized on [0, 1], padded with zeros after normalization."""
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return self.misc.nested_tensor_from_tensor_list([(image.float() / 255 - mean) / std for image in images])


def random_images(sizes, generator):
    """uint8 RGB images of uniform noise, [3, H, W] each."""
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]


def random_targets(labels_per_image, generator, image_sizes=None):
    """
    Ground truth with these labels (COCO ids) and random normalized cx, cy, w, h boxes; with
    `image_sizes`, also `masks` [n, H, W] filling each box.
    """
    targets = []
    for i, labels in enumerate(labels_per_image):
        n = len(labels)
        centers = 0.25 + 0.5 * torch.rand(n, 2, generator=generator)
        sizes = 0.1 + 0.3 * torch.rand(n, 2, generator=generator)
        target = {"labels": torch.tensor(labels, dtype=torch.int64), "boxes": torch.cat([centers, sizes], 1)}
        if image_sizes is not None:
            target["masks"] = box_masks(target["boxes"], image_sizes[i])
        targets.append(target)
    return targets


def box_masks(boxes, size):
    h, w = size
    ys = (torch.arange(h) + 0.5).view(1, h, 1) / h
    xs = (torch.arange(w) + 0.5).view(1, 1, w) / w
    cx, cy, bw, bh = (boxes[:, k].view(-1, 1, 1) for k in range(4))
    return (xs >= cx - bw / 2) & (xs <= cx + bw / 2) & (ys >= cy - bh / 2) & (ys <= cy + bh / 2)


@torch.no_grad()
def randomize_frozen_batch_norm(model, generator):
    """Statistics no identity hides: weight, running_var in [0.75, 1.25]; bias, running_mean in [-0.1, 0.1]."""
    for module in model.modules():
        if type(module).__name__ == "FrozenBatchNorm2d":
            for name, low, high in (("weight", 0.75, 1.25), ("running_var", 0.75, 1.25),
                                    ("bias", -0.1, 0.1), ("running_mean", -0.1, 0.1)):
                buffer = getattr(module, name)
                buffer.copy_(low + (high - low) * torch.rand(buffer.shape, generator=generator))


def normal(shape, std, generator):
    return std * torch.randn(shape, generator=generator)


FOCAL_PRIOR_BIAS = -math.log(99)  # the official sigmoid heads' initial class bias (prior 0.01)


@torch.no_grad()
def round_to_float16(model):
    """The model's state dict in float16, loaded back so that its outputs come from exactly those values."""
    halves = {}  # a tensor shared by several names (one head used by every layer) stays one tensor
    state = {
        k: halves.setdefault((v.data_ptr(), v.shape), v.half()) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return state


def detached(value):
    """Outputs as plain tensors, lists and dicts (no autograd history, no views of the model's)."""
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [detached(v) for v in value]
    return value


def detection_outputs(checkout, model, images):
    """Eval-mode `pred_logits`, `pred_boxes` and `aux_outputs` of the model on the images, one batch."""
    model.eval()
    with torch.no_grad():
        outputs = model(checkout.samples(images))
    return detached(outputs)


def detection_io(checkout, model, criterion, postprocessors, images, targets):
    """The images, outputs, official post-processing, targets and loss terms of one fixture."""
    outputs = detection_outputs(checkout, model, images)
    return {
        "images_uint8_rgb": images,
        **outputs,
        "postprocess": postprocessors["bbox"](outputs, image_sizes(images)),
        "targets_coco_ids": targets,
        "losses": weighted_terms(criterion, criterion(outputs, targets)),
        "weight_dict": dict(criterion.weight_dict),
    }


def weighted_terms(criterion, losses):
    """The criterion's loss terms that the weight dict weighs, as floats (unweighted values)."""
    return {k: v.item() for k, v in losses.items() if k in criterion.weight_dict}


def image_sizes(images):
    return torch.tensor([list(image.shape[1:]) for image in images])


def write_checkpoint(path, state_dict):
    torch.save({"model": state_dict}, path)


def write_args(path, args):
    """The argument namespace (or a dict of them by name) as the stored *_args.json."""
    with open(path, "w") as f:
        json.dump(args if isinstance(args, dict) else vars(args), f, indent=1, sort_keys=True)


def write_tiny_fixture(progress, stem, state, args, io):
    """STEM.pth (the float16 checkpoint), STEM_args.json and STEM_io.pth."""
    write_checkpoint(progress.path(f"{stem}.pth"), state)
    write_args(progress.path(f"{stem}_args.json"), args)
    torch.save(io, progress.path(f"{stem}_io.pth"))
    progress.wrote(f"{stem}.pth", f"{stem}_args.json", f"{stem}_io.pth")


def write_keys(path, state_dict):
    """Every key and shape, one `key<TAB>[d0, d1, ...]` line each, in the state dict's order."""
    with open(path, "w") as f:
        for key, value in state_dict.items():
            f.write(f"{key}\t{list(value.shape)}\n")


class Progress:
    """Prints each file as it is written, with the seconds it took."""

    def __init__(self, output):
        self.output = output
        self.start = time.perf_counter()
        self.written = []

    def path(self, name):
        return self.output / name

    def wrote(self, *names):
        for name in names:
            self.written.append(name)
            print(f"  {name} ({time.perf_counter() - self.start:.1f} s)", flush=True)
