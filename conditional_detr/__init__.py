from .config import add_conditional_detr_config
