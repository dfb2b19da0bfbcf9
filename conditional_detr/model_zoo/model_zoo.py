"""Configs and official checkpoints by name, in the manner of `detectron2.model_zoo`."""

import os
from typing import Optional

import torch
from detectron2.modeling import build_model

from ..checkpoint import ConditionalDETRCheckpointer
from ..checkpoint.catalog import checkpoint_name_for_config
from ..config import get_config as load_config

# The repository's configs/: a link in a source tree, a copy in an installed wheel (setup.py).
CONFIG_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def list_configs():
    """Every config file, relative to configs/ (e.g. "COCO-Detection/detr_R_50_500ep.yaml")."""
    return sorted(
        os.path.relpath(os.path.join(folder, file), CONFIG_ROOT).replace(os.sep, "/")
        for folder, _, files in os.walk(CONFIG_ROOT, followlinks=True)
        for file in files
        if file.endswith(".yaml")
    )


def get_config_file(config_path):
    """
    Args:
        config_path (str): config file name relative to configs/, e.g.
            "COCO-Detection/conditional_detr_R_50_50ep.yaml"
    Returns:
        str: the path of the config file.
    """
    config_file = os.path.join(CONFIG_ROOT, config_path)
    if not os.path.isfile(config_file):
        raise RuntimeError(
            f"config {config_path} is not in the model zoo ({CONFIG_ROOT}); available: "
            + ", ".join(list_configs())
        )
    return config_file


def get_checkpoint_name(config_path):
    """`conditional-detr://NAME` of the official checkpoint trained with `config_path`."""
    return checkpoint_name_for_config(config_path)


def get_config(config_path, trained: bool = False):
    """
    Args:
        config_path (str): config file name relative to configs/.
        trained (bool): set MODEL.WEIGHTS to the official checkpoint of this config
            (an error names the config when none is published); otherwise MODEL.WEIGHTS is
            the config's own, typically an ImageNet backbone.
    Returns:
        CfgNode: the config, not frozen.
    """
    cfg = load_config(get_config_file(config_path))
    if trained:
        cfg.MODEL.WEIGHTS = get_checkpoint_name(config_path)
    return cfg


def get(config_path, trained: bool = False, device: Optional[str] = None):
    """
    The model of a config, with MODEL.WEIGHTS loaded (see :func:`get_config`), in training
    mode, on `device` (default: the config's, or the CPU when there is no GPU).

    Example:
    ::
        from conditional_detr import model_zoo
        model = model_zoo.get("COCO-Detection/conditional_detr_R_50_50ep.yaml", trained=True)
    """
    cfg = get_config(config_path, trained)
    if device is None and not torch.cuda.is_available():
        device = "cpu"
    if device is not None:
        cfg.MODEL.DEVICE = device
    model = build_model(cfg)
    ConditionalDETRCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model
