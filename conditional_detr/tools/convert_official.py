"""
Convert a checkpoint of another implementation into a detectron2 checkpoint of this
project; the format is told by the keys (see `conditional_detr/checkpoint/formats.py`).

    python -m conditional_detr.tools.convert_official SRC.pth DST.pth [--num-classes 80|91]

The 91 COCO-id class logits of the official checkpoints become detectron2's 80 contiguous
COCO classes unless --num-classes 91.
"""
import argparse

import torch

from ..checkpoint import formats


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip() + f" Formats read: {formats.describe()}."
    )
    parser.add_argument("source", help="checkpoint of another implementation (.pth)")
    parser.add_argument("destination", help="detectron2 checkpoint to write (.pth)")
    parser.add_argument("--num-classes", type=int, default=80, choices=(80, 91))
    args = parser.parse_args(argv)

    source_format, state_dict = formats.load(args.source)
    state_dict = source_format.convert(state_dict, args.num_classes)
    torch.save({"model": state_dict, "matching_heuristics": False}, args.destination)
    print(f"wrote {len(state_dict)} tensors ({source_format.repository} format) to {args.destination}")


if __name__ == "__main__":
    main()
