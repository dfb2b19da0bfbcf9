"""
The project's configs by name, and the official Conditional DETR and DETR checkpoints as
`conditional-detr://NAME` (see MODEL_ZOO.md), registered on detectron2's PathManager.
"""

from detectron2.utils.file_io import PathManager

from ..checkpoint.catalog import OFFICIAL_CHECKPOINTS, SCHEME, OfficialCheckpoint
from ..checkpoint.path_handler import OfficialCheckpointHandler, cache_dir
from .model_zoo import get, get_checkpoint_name, get_config, get_config_file, list_configs

__all__ = [
    "OFFICIAL_CHECKPOINTS",
    "SCHEME",
    "OfficialCheckpoint",
    "OfficialCheckpointHandler",
    "cache_dir",
    "checkpoint_handler",
    "get",
    "get_checkpoint_name",
    "get_config",
    "get_config_file",
    "list_configs",
]

checkpoint_handler = OfficialCheckpointHandler()
PathManager.register_handler(checkpoint_handler)
