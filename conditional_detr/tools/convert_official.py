"""
Convert an official Conditional DETR, DETR or Deformable DETR checkpoint into a detectron2
checkpoint of this project (see `conditional_detr.conversion`); the format is told by the keys.

    python -m conditional_detr.tools.convert_official SRC.pth DST.pth [--num-classes 80|91]

The 91 COCO-id class logits become detectron2's 80 contiguous COCO classes unless
--num-classes 91.
"""
import argparse

import torch

from ..conversion import convert_state_dict, load_official_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="official checkpoint (.pth)")
    parser.add_argument("destination", help="detectron2 checkpoint to write (.pth)")
    parser.add_argument("--num-classes", type=int, default=80, choices=(80, 91))
    args = parser.parse_args(argv)

    state_dict = convert_state_dict(load_official_checkpoint(args.source), args.num_classes)
    torch.save({"model": state_dict, "matching_heuristics": False}, args.destination)
    print(f"wrote {len(state_dict)} tensors to {args.destination}")


if __name__ == "__main__":
    main()
