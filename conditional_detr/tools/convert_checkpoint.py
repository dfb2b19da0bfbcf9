"""
Convert checkpoints between this project and the other implementations.

Into this project (the source's format is told by its keys; see
`conditional_detr/checkpoint/formats.py`):

    python -m conditional_detr.tools.convert_checkpoint SRC DST.pth [--num-classes N]

The 91 COCO-id class logits of the official checkpoints become detectron2's 80 contiguous
COCO classes unless --num-classes gives the source's own count (91; 250 for DETR's
panoptic checkpoints).

Out to Hugging Face transformers, a `save_pretrained` folder (model.safetensors,
config.json with the class names as id2label, preprocessor_config.json) that transformers'
`from_pretrained` and pipelines load:

    python -m conditional_detr.tools.convert_checkpoint WEIGHTS --to hf OUT_DIR --config-file CFG [KEY VALUE ...]

WEIGHTS is anything MODEL.WEIGHTS takes (a checkpoint of this project's training, an
official or transformers checkpoint, a conditional-detr:// name), loaded into the model of
CFG; a model transformers has no equivalent of is refused, naming the config key.
"""
import argparse
import os

import torch
from detectron2.modeling import build_model

from ..checkpoint import ConditionalDETRCheckpointer, formats, huggingface
from ..checkpoint.class_heads import COCO_CLASS_NAMES, coco_category_id_names
from ..checkpoint.huggingface_config import check_exportable, image_processor_config, transformers_config
from ..config import get_config
from ..data.datasets import model_class_names

TARGETS = ("detectron2", "hf")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip() + f" Formats read: {formats.describe()}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("source", help="the checkpoint to convert")
    parser.add_argument("destination", help="detectron2 checkpoint to write (.pth), or with --to hf the folder")
    parser.add_argument("--to", choices=TARGETS, default="detectron2", help="what to write (default: %(default)s)")
    parser.add_argument(
        "--num-classes", type=int, default=80,
        help="into this project only: 80 (detectron2's COCO classes) or the source's own count (91 COCO ids, "
        "250 COCO panoptic ids)",
    )
    parser.add_argument("--config-file", help="--to hf: the config of the checkpoint's model")
    parser.add_argument("opts", nargs="*", help="--to hf: config KEY VALUE pairs")
    args = parser.parse_intermixed_args(argv)
    if args.to == "hf" and not args.config_file:
        parser.error("--to hf needs --config-file, the config the checkpoint's model was built with")
    if args.to == "detectron2" and (args.config_file or args.opts):
        parser.error("--config-file and config options are for --to hf")
    return args


def to_detectron2(source, destination, num_classes):
    source_format, state_dict = formats.load(source)
    state_dict = source_format.convert(state_dict, num_classes)
    torch.save({"model": state_dict, "matching_heuristics": False}, destination)
    print(f"wrote {len(state_dict)} tensors ({source_format.repository} format) to {destination}")


def class_names_for(cfg, loaded):
    """The names of the model's classes: the checkpoint's, its dataset's, or COCO's by count."""
    num_classes = cfg.MODEL.DETR.NUM_CLASSES
    candidates = [loaded.get("class_names"), model_class_names(cfg), COCO_CLASS_NAMES, coco_category_id_names()]
    for names in candidates:
        if names is not None and len(names) == num_classes:
            return list(names)
    raise ValueError(
        f"no names for the model's {num_classes} classes: the checkpoint stores none, and "
        "DATASETS.TRAIN names no registered dataset with as many; set DATASETS.TRAIN to the dataset it was trained on"
    )


def heads_shared(state_dict):
    """Whether every decoder layer's class and box heads are the first layer's (no box refinement)."""
    heads = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] in ("class_embed", "bbox_embed") and parts[1].isdigit():
            heads.setdefault((parts[0], ".".join(parts[2:])), []).append(value)
    return all(torch.equal(values[0], other) for values in heads.values() for other in values[1:])


def to_transformers(source, folder, cfg):
    """Write the model of `cfg` with the weights of `source` as a save_pretrained `folder`."""
    check_exportable(cfg)
    target = huggingface.format_of(cfg.MODEL.META_ARCHITECTURE)
    model = build_model(cfg).eval()
    loaded = ConditionalDETRCheckpointer.from_config(cfg, model).load(source)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    written = target.to_transformers(state_dict)
    config = transformers_config(
        cfg, target.model_type, target.model_class, class_names_for(cfg, loaded), tie_heads=heads_shared(state_dict)
    )
    huggingface.write_pretrained(folder, written, config, image_processor_config(cfg, target.model_class))
    print(f"wrote {target.model_class} ({len(written)} tensors, {len(config['id2label'])} classes) to {folder}")


def main(argv=None):
    args = parse_args(argv)
    if args.to == "detectron2":
        to_detectron2(args.source, args.destination, args.num_classes)
        return
    cfg = get_config(args.config_file, ["MODEL.DEVICE", "cpu", *args.opts])
    to_transformers(args.source, os.path.abspath(args.destination), cfg)


if __name__ == "__main__":
    main()
