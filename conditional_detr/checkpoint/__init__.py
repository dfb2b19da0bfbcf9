"""
Checkpoints of the package's detectors: the checkpointer (`checkpointer.py`), the formats of
other implementations it converts (`formats.py`, the registry; one module per source:
`official.py`, `mmdetection.py`, `huggingface.py`, the last two on `foreign.py`), the
class-head policy of MODEL.WEIGHTS_CLASS_HEAD (`class_heads.py`), and the published checkpoints
by name (`catalog.py`) with the `conditional-detr://` path handler (`path_handler.py`).
"""
from .checkpointer import ConditionalDETRCheckpointer
from .formats import FORMATS, recognize

__all__ = ["FORMATS", "ConditionalDETRCheckpointer", "recognize"]
