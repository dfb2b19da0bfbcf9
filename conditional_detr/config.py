from detectron2.config import CfgNode as CN

from .data.dataset_mapper import add_detr_augmentation_config


def add_conditional_detr_config(cfg):
    """
    Add the config keys of Conditional DETR, and of DETR and Deformable DETR (which read
    the same keys, Deformable DETR also its own under MODEL.DEFORMABLE_DETR), to a
    detectron2 config.
    """
    cfg.MODEL.CONDITIONAL_DETR = CN()
    # Number of foreground classes (80 for COCO in detectron2's contiguous ids).
    cfg.MODEL.CONDITIONAL_DETR.NUM_CLASSES = 80
    # Number of object queries, i.e. detection slots per image.
    cfg.MODEL.CONDITIONAL_DETR.NUM_OBJECT_QUERIES = 300
    # Groups of object queries in training (Group DETR, Chen et al., ICCV 2023): each of the
    # QUERY_GROUPS - 1 extra groups of NUM_OBJECT_QUERIES queries is matched one-to-one on its
    # own and attends only within itself, for more positive samples per image; inference
    # uses the first group alone, so the deployed model is the same. 1: the paper's model.
    cfg.MODEL.CONDITIONAL_DETR.QUERY_GROUPS = 1
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
    # Weight of the classification loss.
    cfg.MODEL.CONDITIONAL_DETR.CLASS_WEIGHT = 2.0
    # Weight of the L1 box loss.
    cfg.MODEL.CONDITIONAL_DETR.L1_WEIGHT = 5.0
    # Weight of the GIoU box loss.
    cfg.MODEL.CONDITIONAL_DETR.GIOU_WEIGHT = 2.0
    # Detections kept per image: the top-k over queries x classes.
    cfg.MODEL.CONDITIONAL_DETR.NUM_TOPK = 100
    # Classification loss: "focal" (sigmoid focal loss over NUM_CLASSES logits, top-k
    # inference) or "softmax" (DETR's cross-entropy over NUM_CLASSES + 1 logits, the last
    # one "no object", best class per query at inference); the paper's Table 4.
    cfg.MODEL.CONDITIONAL_DETR.CLASS_LOSS = "focal"
    # Softmax loss only: cross-entropy weight of the "no object" class (DETR's eos_coef).
    cfg.MODEL.CONDITIONAL_DETR.EOS_COEF = 0.1
    # Reference points s (Section 4.3): "predicted" from the object query by an FFN,
    # "learned" as a free 2D point per query, or "zero" (s = (0, 0) as in DETR).
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
    # Cross-attention implementation: "auto" (compiled when built for the device),
    # "compiled" (fail if unavailable) or "pytorch" (the reference path).
    cfg.MODEL.CONDITIONAL_DETR.ATTENTION_IMPL = "auto"
    # Run the backbone (and Deformable DETR's input projections) in channels-last memory
    # format, which CPU (oneDNN) and GPU (cuDNN) convolutions run faster; same weights.
    cfg.MODEL.CONDITIONAL_DETR.CHANNELS_LAST = True
    # Compute each frozen BatchNorm of the backbone inside the convolution before it (weight
    # and bias scaled on the fly): fewer passes over the features, same weights and outputs
    # up to rounding.
    cfg.MODEL.CONDITIONAL_DETR.FOLD_FROZEN_BATCHNORM = True

    # Deformable DETR (MODEL.META_ARCHITECTURE "DeformableDETR"); it reads the keys above too.
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

    # Your own data: datasets from the config, fine-tuning to other classes, EMA.
    # COCO-format datasets to register, each (name, json_file, image_root); the names can
    # then be used in DATASETS.TRAIN / DATASETS.TEST (see data/datasets.py).
    cfg.DATASETS.COCO_INSTANCES = ()
    # What loading a checkpoint whose classes are not the model's does with its class head
    # (a checkpoint with the model's classes always loads whole): "keep" (load it; another
    # class count is an error), "reinit" (the model's own initialization, the focal-loss
    # prior, everything else loaded) or "match_names" (the checkpoint's rows of classes
    # whose names the model's dataset has too, the model's initialization for the others).
    cfg.MODEL.CONDITIONAL_DETR.CHECKPOINT_CLASS_HEAD = "keep"
    cfg.SOLVER.EMA = CN()
    # Keep an exponential moving average of the weights, evaluated and checkpointed with the model.
    cfg.SOLVER.EMA.ENABLED = False
    # Weight of the average at every step: average = DECAY * average + (1 - DECAY) * weights.
    cfg.SOLVER.EMA.DECAY = 0.9997
