from detectron2.config import CfgNode as CN

from .data.dataset_mapper import add_detr_augmentation_config


def add_conditional_detr_config(cfg):
    """
    Add the config keys of Conditional DETR to a detectron2 config.
    """
    cfg.MODEL.CONDITIONAL_DETR = CN()
    # Number of foreground classes (80 for COCO in detectron2's contiguous ids).
    cfg.MODEL.CONDITIONAL_DETR.NUM_CLASSES = 80
    # Number of object queries, i.e. detection slots per image.
    cfg.MODEL.CONDITIONAL_DETR.NUM_OBJECT_QUERIES = 300
    # Width of the transformer.
    cfg.MODEL.CONDITIONAL_DETR.HIDDEN_DIM = 256
    # Attention heads in every attention layer.
    cfg.MODEL.CONDITIONAL_DETR.NHEADS = 8
    # Number of transformer encoder layers.
    cfg.MODEL.CONDITIONAL_DETR.ENC_LAYERS = 6
    # Number of conditional decoder layers.
    cfg.MODEL.CONDITIONAL_DETR.DEC_LAYERS = 6
    # Hidden width of the feed-forward blocks.
    cfg.MODEL.CONDITIONAL_DETR.DIM_FEEDFORWARD = 2048
    # Dropout in the transformer (attention weights and residual branches).
    cfg.MODEL.CONDITIONAL_DETR.DROPOUT = 0.1
    # Auxiliary losses on the output of every decoder layer.
    cfg.MODEL.CONDITIONAL_DETR.DEEP_SUPERVISION = True
    # Alpha of the sigmoid focal loss (classification loss and matching cost).
    cfg.MODEL.CONDITIONAL_DETR.FOCAL_ALPHA = 0.25
    # Gamma of the sigmoid focal loss (classification loss and matching cost).
    cfg.MODEL.CONDITIONAL_DETR.FOCAL_GAMMA = 2.0
    # Weight of the classification cost in the Hungarian matching.
    cfg.MODEL.CONDITIONAL_DETR.COST_CLASS = 2.0
    # Weight of the L1 box cost in the Hungarian matching.
    cfg.MODEL.CONDITIONAL_DETR.COST_BBOX = 5.0
    # Weight of the GIoU cost in the Hungarian matching.
    cfg.MODEL.CONDITIONAL_DETR.COST_GIOU = 2.0
    # Weight of the focal classification loss.
    cfg.MODEL.CONDITIONAL_DETR.CLASS_WEIGHT = 2.0
    # Weight of the L1 box loss.
    cfg.MODEL.CONDITIONAL_DETR.L1_WEIGHT = 5.0
    # Weight of the GIoU box loss.
    cfg.MODEL.CONDITIONAL_DETR.GIOU_WEIGHT = 2.0
    # Detections kept per image: the top-k over queries x classes.
    cfg.MODEL.CONDITIONAL_DETR.NUM_TOPK = 100
    # Cross-attention implementation: "auto" (compiled when built for the device),
    # "compiled" (fail if unavailable) or "pytorch" (the reference path).
    cfg.MODEL.CONDITIONAL_DETR.ATTENTION_IMPL = "auto"

    # AdamW with a reduced learning rate on the backbone, as the official recipe.
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Learning-rate multiplier of the backbone parameters.
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Gradient clipping of the whole model by its total L2 norm.
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.1
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0

    # DETR's resize-then-crop augmentation (INPUT.CROP.*)
    add_detr_augmentation_config(cfg)
