"""
The config keys of the package's detectors. MODEL.DETR holds what every set-prediction
detector of the package has (sizes, queries, matching costs, losses, the ops' implementation);
MODEL.CONDITIONAL_DETR and MODEL.DEFORMABLE_DETR hold what only that detector reads. Keys of
earlier releases are answered with their new names (RENAMED_KEYS).
"""
import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .data.dataset_mapper import add_detr_augmentation_config
from .data.datasets import register_coco_datasets

__all__ = ["DETECTOR_NODES", "RENAMED_KEYS", "add_conditional_detr_config", "get_config", "resolve_device"]

# The nodes of keys that only one meta-architecture reads.
DETECTOR_NODES = {"CONDITIONAL_DETR": "ConditionalDETR", "DEFORMABLE_DETR": "DeformableDETR"}

_OLD = "MODEL.CONDITIONAL_DETR."
# Keys of earlier releases: a config file or command line that sets one stops, naming the new key.
RENAMED_KEYS = {
    **{
        _OLD + key: "MODEL.DETR." + key
        for key in (
            "NUM_CLASSES", "NUM_OBJECT_QUERIES", "QUERY_GROUPS", "HIDDEN_DIM", "NHEADS", "ENC_LAYERS",
            "DEC_LAYERS", "DIM_FEEDFORWARD", "DROPOUT", "DEEP_SUPERVISION", "CLASS_LOSS", "FOCAL_ALPHA",
            "FOCAL_GAMMA", "CLASS_WEIGHT", "L1_WEIGHT", "GIOU_WEIGHT",
        )
    },
    _OLD + "EOS_COEF": "MODEL.DETR.NO_OBJECT_WEIGHT",
    _OLD + "COST_CLASS": "MODEL.DETR.CLASS_COST",
    _OLD + "COST_BBOX": "MODEL.DETR.L1_COST",
    _OLD + "COST_GIOU": "MODEL.DETR.GIOU_COST",
    _OLD + "ATTENTION_IMPL": "MODEL.DETR.OPS_IMPL",
    _OLD + "NUM_TOPK": "TEST.DETECTIONS_PER_IMAGE",
    _OLD + "CHANNELS_LAST": "MODEL.BACKBONE.CHANNELS_LAST",
    _OLD + "FOLD_FROZEN_BATCHNORM": "MODEL.BACKBONE.FOLD_FROZEN_BATCHNORM",
    _OLD + "CHECKPOINT_CLASS_HEAD": "MODEL.WEIGHTS_CLASS_HEAD",
}


def add_conditional_detr_config(cfg):
    """Add the keys of DETR, Conditional DETR and Deformable DETR to a detectron2 config."""
    cfg.MODEL.DETR = CN()
    # Number of foreground classes (80 for COCO in detectron2's contiguous ids).
    cfg.MODEL.DETR.NUM_CLASSES = 80
    # Number of object queries, i.e. detection slots per image.
    cfg.MODEL.DETR.NUM_OBJECT_QUERIES = 300
    # Groups of object queries in training (Group DETR, Chen et al., ICCV 2023): each of the
    # QUERY_GROUPS - 1 extra groups of NUM_OBJECT_QUERIES queries is matched one-to-one on its
    # own and attends only within itself, for more positive samples per image; inference
    # uses the first group alone, so the deployed model is the same. 1: the papers' models.
    cfg.MODEL.DETR.QUERY_GROUPS = 1
    # Width of the transformer.
    cfg.MODEL.DETR.HIDDEN_DIM = 256
    # Attention heads in every attention layer.
    cfg.MODEL.DETR.NHEADS = 8
    # Number of transformer encoder layers.
    cfg.MODEL.DETR.ENC_LAYERS = 6
    # Number of decoder layers.
    cfg.MODEL.DETR.DEC_LAYERS = 6
    # Hidden width of the feed-forward blocks.
    cfg.MODEL.DETR.DIM_FEEDFORWARD = 2048
    # Dropout in the transformer (attention weights and residual branches).
    cfg.MODEL.DETR.DROPOUT = 0.1
    # Auxiliary losses on the output of every decoder layer.
    cfg.MODEL.DETR.DEEP_SUPERVISION = True
    # Classification loss: "focal" (sigmoid focal loss over NUM_CLASSES logits, top-k
    # inference) or "softmax" (DETR's cross-entropy over NUM_CLASSES + 1 logits, the last
    # one "no object", best class per query at inference); Conditional DETR's Table 4.
    cfg.MODEL.DETR.CLASS_LOSS = "focal"
    # Focal loss only: alpha of the loss and of the matching cost.
    cfg.MODEL.DETR.FOCAL_ALPHA = 0.25
    # Focal loss only: gamma of the loss and of the matching cost.
    cfg.MODEL.DETR.FOCAL_GAMMA = 2.0
    # Softmax loss only: cross-entropy weight of the "no object" class (DETR's eos_coef).
    cfg.MODEL.DETR.NO_OBJECT_WEIGHT = 0.1
    # Weight of the classification cost in the Hungarian matching.
    cfg.MODEL.DETR.CLASS_COST = 2.0
    # Weight of the L1 box cost in the Hungarian matching.
    cfg.MODEL.DETR.L1_COST = 5.0
    # Weight of the GIoU cost in the Hungarian matching.
    cfg.MODEL.DETR.GIOU_COST = 2.0
    # Weight of the classification loss.
    cfg.MODEL.DETR.CLASS_WEIGHT = 2.0
    # Weight of the L1 box loss.
    cfg.MODEL.DETR.L1_WEIGHT = 5.0
    # Weight of the GIoU box loss.
    cfg.MODEL.DETR.GIOU_WEIGHT = 2.0
    # MODEL.MASK_ON only (DETR's mask head): weights of the masks' sigmoid focal loss and DICE loss.
    cfg.MODEL.DETR.MASK_WEIGHT = 1.0
    cfg.MODEL.DETR.DICE_WEIGHT = 1.0
    # MODEL.MASK_ON only: freeze every parameter of the detector and train the mask head alone,
    # the paper's recipe on a trained detector (the official --frozen_weights); False trains
    # both together.
    cfg.MODEL.DETR.TRAIN_MASK_HEAD_ONLY = False
    # MODEL.MASK_ON only: inference returns "panoptic_seg" too, DETR's panoptic segmentation.
    cfg.MODEL.DETR.PANOPTIC_ON = False
    # Its queries: those whose best class (not "no object") scores above this.
    cfg.MODEL.DETR.PANOPTIC_THRESHOLD = 0.85
    # Its segments of this many pixels or fewer are dropped and their pixels assigned again.
    cfg.MODEL.DETR.PANOPTIC_MIN_AREA = 4
    # The compiled ops (cross-attention, deformable attention, dropout): "auto" (compiled
    # where built for the device), "compiled" (fail where unavailable) or "pytorch" (the
    # reference path).
    cfg.MODEL.DETR.OPS_IMPL = "auto"
    # Detections kept per image (detectron2's key): the top-k over queries x classes of the
    # focal loss; the softmax loss keeps every query.
    cfg.TEST.DETECTIONS_PER_IMAGE = 100

    # Conditional DETR's own keys: the ablations of its paper's Section 4.3.
    cfg.MODEL.CONDITIONAL_DETR = CN()
    # Reference points s: "predicted" from the object query by an FFN, "learned" as a free
    # 2D point per query, or "zero" (s = (0, 0) as in DETR).
    cfg.MODEL.CONDITIONAL_DETR.REFERENCE_POINTS = "predicted"
    # Conditional spatial query (Table 3): "CSQ" λq(f) ⊙ sinusoidal(s); "CSQ-C" the
    # decoder embedding f; "CSQ-T" λq(f) alone; "CSQ-P" sinusoidal(s) alone; "CSQ-I"
    # λq predicted from the self-attention output c_q instead of f.
    cfg.MODEL.CONDITIONAL_DETR.SPATIAL_QUERY = "CSQ"
    # Form of the transformation T predicted from f (Figure 5): "diagonal" (λq),
    # "identity", "scalar", "block" (a head_dim x head_dim block per head) or "full".
    cfg.MODEL.CONDITIONAL_DETR.TRANSFORMATION = "diagonal"
    # Predict the box centre as an offset from the reference point (Table 4's OR);
    # off, the box head predicts the box on its own as in DETR.
    cfg.MODEL.CONDITIONAL_DETR.BOX_OFFSET = True

    # How the backbone runs; the same weights and outputs either way.
    # Channels-last memory format (with Deformable DETR's input projections), which CPU
    # (oneDNN) and GPU (cuDNN) convolutions run faster.
    cfg.MODEL.BACKBONE.CHANNELS_LAST = True
    # Compute each frozen BatchNorm inside the convolution before it (weight and bias
    # scaled on the fly): fewer passes over the features, outputs equal up to rounding.
    cfg.MODEL.BACKBONE.FOLD_FROZEN_BATCHNORM = True
    # In inference, the backbone compiled by inductor with frozen weights
    # (modeling/compiled_backbone.py): faster per image, compiled again for each new input
    # size, so for fixed sizes (a deployment, a benchmark).
    cfg.MODEL.BACKBONE.COMPILE_FOR_INFERENCE = False

    # What loading MODEL.WEIGHTS does with a class head whose classes are not the model's
    # (one with the model's classes always loads whole): "keep" (load it; another class
    # count is an error), "reinit" (the model's own initialization, the focal-loss prior,
    # everything else loaded) or "match_names" (the checkpoint's rows of classes whose
    # names the model's dataset has too, the model's initialization for the others).
    cfg.MODEL.WEIGHTS_CLASS_HEAD = "keep"

    # Deformable DETR's own keys.
    cfg.MODEL.DEFORMABLE_DETR = CN()
    # Feature levels: the ResNet stages of MODEL.RESNETS.OUT_FEATURES (res3-res5), then
    # stride-2 3x3 convs with GroupNorm, the first on the raw output of the last stage.
    cfg.MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS = 4
    # Sampling points per head and feature level in the encoder's deformable attention.
    cfg.MODEL.DEFORMABLE_DETR.ENC_N_POINTS = 4
    # Sampling points per head and feature level in the decoder's deformable attention.
    cfg.MODEL.DEFORMABLE_DETR.DEC_N_POINTS = 4
    # Iterative box refinement: every decoder layer refines the previous layer's boxes,
    # with class and box heads of its own.
    cfg.MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE = False
    # Two-stage: the decoder starts from the encoder's best-scoring proposals instead of
    # learned queries (needs WITH_BOX_REFINE).
    cfg.MODEL.DEFORMABLE_DETR.TWO_STAGE = False
    # Learning-rate multiplier of the sampling-offset and reference-point projections.
    cfg.MODEL.DEFORMABLE_DETR.LINEAR_PROJ_LR_MULTIPLIER = 0.1

    # Autocast dtype of SOLVER.AMP.ENABLED training: "bfloat16" (CPU and GPU, no gradient
    # scaling) or "float16" (GPU only, with detectron2's gradient scaler).
    cfg.SOLVER.AMP.PRECISION = "bfloat16"
    cfg.TEST.AMP = CN()
    # Run inference (evaluation, demo) under autocast; post-processing stays float32.
    cfg.TEST.AMP.ENABLED = False
    # Its dtype: "bfloat16" (CPU and GPU) or "float16" (GPU).
    cfg.TEST.AMP.PRECISION = "bfloat16"

    # AdamW with a reduced learning rate on the backbone, as the official recipes.
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

    # Your own data: datasets from the config, EMA.
    # COCO-format datasets to register, each (name, json_file, image_root); the names can
    # then be used in DATASETS.TRAIN / DATASETS.TEST (see data/datasets.py).
    cfg.DATASETS.COCO_INSTANCES = ()
    cfg.SOLVER.EMA = CN()
    # Keep an exponential moving average of the weights, evaluated and checkpointed with the model.
    cfg.SOLVER.EMA.ENABLED = False
    # Weight of the average at every step: average = DECAY * average + (1 - DECAY) * weights.
    cfg.SOLVER.EMA.DECAY = 0.9997
    for old, new in RENAMED_KEYS.items():
        if not cfg.key_is_renamed(old):
            cfg.register_renamed_key(old, new)


def resolve_device(cfg):
    """MODEL.DEVICE "auto" means the GPU when there is one, else the CPU."""
    if cfg.MODEL.DEVICE == "auto":
        cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


def get_config(config_file: str = "", opts=()):
    """
    A config of the package's detectors from a YAML file and "KEY VALUE" overrides, not
    frozen, with the datasets of DATASETS.COCO_INSTANCES registered.
    """
    cfg = get_cfg()
    add_conditional_detr_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts or []))
    register_coco_datasets(cfg)
    return resolve_device(cfg)
