"""
Convert a checkpoint of another implementation into a detectron2 checkpoint of this
project: `convert_checkpoint`'s conversion into this project, under its first name.

    python -m conditional_detr.tools.convert_official SRC.pth DST.pth [--num-classes N]
"""
from .convert_checkpoint import main

if __name__ == "__main__":
    main()
