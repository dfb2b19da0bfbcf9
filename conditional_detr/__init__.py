from . import data  # registers the embedded datasets
from .config import add_conditional_detr_config
from .modeling import DETR, ConditionalDETR, DeformableDETR
from . import model_zoo  # registers conditional-detr:// checkpoints on detectron2's PathManager
