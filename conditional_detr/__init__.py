from . import data  # registers the embedded datasets
from .config import add_conditional_detr_config
from .modeling import ConditionalDETR
