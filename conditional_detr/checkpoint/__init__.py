"""
Checkpoints of the package's detectors: the checkpointer (`checkpointer.py`), the foreign
formats it converts (`formats.py`, one module per source: `official.py`), the class-head
policy of MODEL.WEIGHTS_CLASS_HEAD (`class_heads.py`), and the published checkpoints by
name (`catalog.py`) with the `conditional-detr://` path handler (`path_handler.py`).
"""
from .checkpointer import ConditionalDETRCheckpointer
from .formats import FORMATS, recognize

__all__ = ["FORMATS", "ConditionalDETRCheckpointer", "recognize"]
