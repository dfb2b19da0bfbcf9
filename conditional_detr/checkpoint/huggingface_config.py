"""
transformers' `config.json` in this project's terms: each setting that changes what a model
computes is one of this project's config keys (`SETTINGS`), and the few that have none here
are refused by name. Loading checks a checkpoint's settings against the model's config
(weights of the right shapes can still compute something else: a dilated res5, another
head count); writing a checkpoint out derives them from the config.
"""
from dataclasses import dataclass, field

__all__ = [
    "SETTINGS", "Setting", "check_exportable", "check_settings", "image_processor_config", "project_settings", "transformers_config",
    "unrepresentable",
]


@dataclass(frozen=True)
class Setting:
    """A config.json setting, the project's config key it is, and their values where they differ."""

    name: str
    key: str
    values: dict = field(default_factory=dict)  # config.json's value -> the project's
    architectures: tuple = ("ConditionalDETR", "DETR", "DeformableDETR")

    def to_project(self, value):
        return self.values.get(value, value) if self.values else value

    def to_transformers(self, value):
        inverse = {v: k for k, v in self.values.items()}
        return inverse.get(value, value) if self.values else value


_DEFORMABLE = ("DeformableDETR",)
SETTINGS = (
    Setting("d_model", "MODEL.DETR.HIDDEN_DIM"),
    Setting("encoder_layers", "MODEL.DETR.ENC_LAYERS"),
    Setting("decoder_layers", "MODEL.DETR.DEC_LAYERS"),
    Setting("encoder_attention_heads", "MODEL.DETR.NHEADS"),
    Setting("decoder_attention_heads", "MODEL.DETR.NHEADS"),
    Setting("encoder_ffn_dim", "MODEL.DETR.DIM_FEEDFORWARD"),
    Setting("decoder_ffn_dim", "MODEL.DETR.DIM_FEEDFORWARD"),
    Setting("num_queries", "MODEL.DETR.NUM_OBJECT_QUERIES"),
    Setting("dilation", "MODEL.RESNETS.RES5_DILATION", {False: 1, True: 2}),
    Setting("backbone", "MODEL.RESNETS.DEPTH", {"resnet50": 50, "resnet101": 101}),
    Setting("num_feature_levels", "MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS", architectures=_DEFORMABLE),
    Setting("encoder_n_points", "MODEL.DEFORMABLE_DETR.ENC_N_POINTS", architectures=_DEFORMABLE),
    Setting("decoder_n_points", "MODEL.DEFORMABLE_DETR.DEC_N_POINTS", architectures=_DEFORMABLE),
    Setting("with_box_refine", "MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE", architectures=_DEFORMABLE),
    Setting("two_stage", "MODEL.DEFORMABLE_DETR.TWO_STAGE", architectures=_DEFORMABLE),
    # the official two-stage model keeps as many proposals as it has queries
    Setting("two_stage_num_proposals", "MODEL.DETR.NUM_OBJECT_QUERIES", architectures=_DEFORMABLE),
)

# settings with one value here: (name, the value this project computes)
_FIXED = (("position_embedding_type", "sine"), ("activation_function", "relu"))


def _backbone_settings(config):
    """The ResNet name and res5's output stride of either spelling: `backbone`, or a timm `backbone_config`."""
    backbone_config = config.get("backbone_config") or {}
    name = config.get("backbone") or backbone_config.get("backbone") or backbone_config.get("model_name")
    output_stride = backbone_config.get("output_stride") or (16 if config.get("dilation") else 32)
    return name, output_stride


def _config_value(config, name):
    if name == "backbone":
        return _backbone_settings(config)[0]
    if name == "dilation":
        return _backbone_settings(config)[1] == 16
    return config.get(name)


def unrepresentable(config):
    """The settings of `config` this project's models lack, as "name=value" texts."""
    differences = [f"{name}={config[name]!r}" for name, value in _FIXED if config.get(name, value) != value]
    name, output_stride = _backbone_settings(config)
    model_type = (config.get("backbone_config") or {}).get("model_type", "timm_backbone")
    if model_type != "timm_backbone":
        differences.append(f"backbone_config.model_type={model_type!r}")
    setting = next(s for s in SETTINGS if s.name == "backbone")
    if name is not None and name not in setting.values:
        differences.append(f"backbone={name!r}")
    if output_stride not in (16, 32):
        differences.append(f"backbone_config.output_stride={output_stride!r}")
    return differences


def project_settings(config, architecture):
    """
    {config key: value} of the settings of `config` that the project's `architecture` has; a
    ValueError names two settings that are one key here (encoder and decoder heads) and differ.
    """
    two_stage = bool(config.get("two_stage"))
    settings, names = {}, {}
    for setting in SETTINGS:
        value = _config_value(config, setting.name)
        if value is None or architecture not in setting.architectures:
            continue
        # a two-stage model's queries are its proposals
        if setting.name == "num_queries" and two_stage:
            continue
        if setting.name == "two_stage_num_proposals" and not two_stage:
            continue
        value = setting.to_project(value)
        if settings.get(setting.key, value) != value:
            first = names[setting.key]
            raise ValueError(
                f"{first}={_config_value(config, first)!r} and {setting.name}={_config_value(config, setting.name)!r} "
                f"differ, one {setting.key} here"
            )
        settings[setting.key], names[setting.key] = value, setting.name
    return settings


def _cfg_value(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_settings(config, architecture, cfg, filename):
    """
    Refuse, naming each setting, a checkpoint whose `config.json` computes something the
    model of `cfg` does not: a setting this project lacks, or one whose config key differs.
    """
    differences = unrepresentable(config)
    try:
        settings = project_settings(config, architecture)
    except ValueError as e:
        differences.append(str(e))
    if differences:
        raise ValueError(f"{filename}: a transformers model this project cannot represent: {', '.join(differences)}")
    if cfg is None:
        return
    for key, value in settings.items():
        if _cfg_value(cfg, key) != value:
            differences.append(f"{key} {value!r} (the model's: {_cfg_value(cfg, key)!r})")
    if differences:
        raise ValueError(
            f"{filename}: its config.json describes another model than the one configured; set "
            f"{'; '.join(differences)}"
        )


# what the model of a config must be for transformers' model to compute the same:
# (config key, the values transformers' models have, the architectures it applies to)
_EXPORTABLE = (
    ("MODEL.CONDITIONAL_DETR.REFERENCE_POINTS", ("predicted",), ("ConditionalDETR",)),
    ("MODEL.CONDITIONAL_DETR.SPATIAL_QUERY", ("CSQ",), ("ConditionalDETR",)),
    ("MODEL.CONDITIONAL_DETR.TRANSFORMATION", ("diagonal",), ("ConditionalDETR",)),
    ("MODEL.CONDITIONAL_DETR.BOX_OFFSET", (True,), ("ConditionalDETR",)),
    # their class heads: sigmoid focal, and DETR's softmax with "no object"
    ("MODEL.DETR.CLASS_LOSS", ("focal",), ("ConditionalDETR", "DeformableDETR")),
    ("MODEL.DETR.CLASS_LOSS", ("softmax",), ("DETR",)),
    ("MODEL.RESNETS.DEPTH", (50, 101), None),
    ("MODEL.RESNETS.RES5_DILATION", (1, 2), None),
    ("MODEL.RESNETS.NORM", ("FrozenBN",), None),
    ("MODEL.RESNETS.STRIDE_IN_1X1", (False,), None),
    ("MODEL.RESNETS.NUM_GROUPS", (1,), None),
    ("MODEL.RESNETS.WIDTH_PER_GROUP", (64,), None),
    ("MODEL.RESNETS.DEFORM_ON_PER_STAGE", ([False] * 4,), None),
    # transformers' image processors give RGB images
    ("INPUT.FORMAT", ("RGB",), None),
)


def check_exportable(cfg):
    """Refuse, naming each config key, a model of `cfg` that transformers' model would not compute."""
    architecture = cfg.MODEL.META_ARCHITECTURE
    differences = [
        f"{key} {_cfg_value(cfg, key)!r} (transformers': {' or '.join(map(repr, values))})"
        for key, values, architectures in _EXPORTABLE
        if (architectures is None or architecture in architectures) and _cfg_value(cfg, key) not in values
    ]
    if differences:
        raise ValueError(
            f"this {architecture} has no transformers equivalent: {'; '.join(differences)}"
        )


def transformers_config(cfg, model_type, model_class, class_names, tie_heads):
    """
    The config.json of the model of `cfg` (`check_exportable` first) with `class_names` as
    `id2label`; `tie_heads`: whether its decoder layers share their heads, as transformers
    ties them by default.
    """
    check_exportable(cfg)
    architecture = cfg.MODEL.META_ARCHITECTURE
    config = {
        "architectures": [model_class],
        "model_type": model_type,
        # transformers' spelling of the released models: timm's ResNet, torchvision's network
        "use_timm_backbone": True,
        "use_pretrained_backbone": False,
        "backbone_config": None,
        "num_channels": 3,
        "position_embedding_type": "sine",
        "activation_function": "relu",
        "dropout": cfg.MODEL.DETR.DROPOUT,
        # transformers' DETR and Conditional DETR with auxiliary_loss feed each decoder layer the
        # previous one's output through the final LayerNorm, which the official models do not
        "auxiliary_loss": False,
        "tie_word_embeddings": tie_heads,
        "id2label": {str(i): name for i, name in enumerate(class_names)},
        "label2id": {name: i for i, name in enumerate(class_names) if name != "N/A"},
    }
    if cfg.MODEL.DETR.CLASS_LOSS == "focal":
        config["focal_alpha"] = cfg.MODEL.DETR.FOCAL_ALPHA
    for setting in SETTINGS:
        if architecture in setting.architectures:
            config[setting.name] = setting.to_transformers(_cfg_value(cfg, setting.key))
    return config


def image_processor_config(cfg, model_class):
    """The preprocessor_config.json of `cfg`'s test-time resizing and normalization (RGB, 0-1)."""
    return {
        "image_processor_type": model_class.replace("ForObjectDetection", "ImageProcessor"),
        "format": "coco_detection",
        "do_resize": True,
        "size": {"shortest_edge": cfg.INPUT.MIN_SIZE_TEST, "longest_edge": cfg.INPUT.MAX_SIZE_TEST},
        "resample": 2,  # bilinear, as detectron2's ResizeShortestEdge
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [value / 255 for value in cfg.MODEL.PIXEL_MEAN],
        "image_std": [value / 255 for value in cfg.MODEL.PIXEL_STD],
        "do_pad": True,
    }
