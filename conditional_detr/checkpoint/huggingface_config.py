"""
transformers' `config.json` in this project's terms: each setting that changes what a model
computes is one of this project's config keys (`SETTINGS`), and the few that have none here
are refused by name. Loading checks a checkpoint's settings against the model's config
(weights of the right shapes can still compute something else: a dilated res5, another
head count); writing a checkpoint out derives them from the config.
"""
from dataclasses import dataclass, field

__all__ = ["SETTINGS", "Setting", "check_settings", "project_settings", "unrepresentable"]


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
