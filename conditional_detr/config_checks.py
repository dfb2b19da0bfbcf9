"""
The checks every detector of the package shares, run when the model is built: values of the
MODEL.DETR keys that cannot work, and keys of another detector's node, which this one would
silently ignore. Each stops with an error naming the key and the value, rather than deep
inside a layer or the loss. Each detector checks its own node's keys beside its code.
"""
import functools

import torch
from detectron2.config import get_cfg

from .config import DETECTOR_NODES, add_conditional_detr_config

__all__ = ["check_detector_keys", "check_device", "check_shared_keys"]

_PREFIX = "MODEL.DETR."

# key: (least value, whether the least value itself is allowed)
_LOWER_BOUNDS = {
    "NUM_CLASSES": (1, True),
    "NUM_OBJECT_QUERIES": (1, True),
    "QUERY_GROUPS": (1, True),
    "HIDDEN_DIM": (1, True),
    "NHEADS": (1, True),
    "ENC_LAYERS": (0, True),  # DETR's ablation without an encoder
    "DEC_LAYERS": (1, True),
    "DIM_FEEDFORWARD": (1, True),
    "DROPOUT": (0.0, True),
    "FOCAL_ALPHA": (0.0, True),
    "FOCAL_GAMMA": (0.0, True),
    "CLASS_COST": (0.0, True),
    "L1_COST": (0.0, True),
    "GIOU_COST": (0.0, True),
    "CLASS_WEIGHT": (0.0, True),
    "L1_WEIGHT": (0.0, True),
    "GIOU_WEIGHT": (0.0, True),
    "MASK_WEIGHT": (0.0, True),
    "DICE_WEIGHT": (0.0, True),
    "NO_OBJECT_WEIGHT": (0.0, False),
}
_UPPER_BOUNDS = {"DROPOUT": (1.0, False), "FOCAL_ALPHA": (1.0, True)}


def _check_bound(key, value, bound, lower):
    limit, inclusive = bound
    ok = (value >= limit if inclusive else value > limit) if lower else (value <= limit if inclusive else value < limit)
    if not ok:
        relation = (">=" if inclusive else ">") if lower else ("<=" if inclusive else "<")
        raise ValueError(f"{_PREFIX}{key} must be {relation} {limit}, got {value!r}")


def check_device(device, num_processes=1):
    """
    MODEL.DEVICE and the processes of a run against the GPUs there are: torch's own error,
    raised when the model or a process first touches CUDA, names neither the key nor the
    way out.
    """
    if torch.device(device).type != "cuda":
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise ValueError(
            f"MODEL.DEVICE {device!r}, but this machine has no CUDA device; "
            "set MODEL.DEVICE cpu (or auto: the GPU where there is one)"
        )
    if num_processes > available:
        raise ValueError(
            f"--num-gpus {num_processes} with MODEL.DEVICE {device!r}, but this machine has "
            f"{available} CUDA device(s)"
        )


def check_shared_keys(cfg):
    """The MODEL.DETR keys of every detector of the package, TEST.DETECTIONS_PER_IMAGE and MODEL.DEVICE."""
    check_device(cfg.MODEL.DEVICE)
    args = cfg.MODEL.DETR
    for key, bound in _LOWER_BOUNDS.items():
        _check_bound(key, args[key], bound, lower=True)
    for key, bound in _UPPER_BOUNDS.items():
        _check_bound(key, args[key], bound, lower=False)
    if args.HIDDEN_DIM % 4:
        # the sine encodings give each coordinate HIDDEN_DIM / 2 channels, half sines, half cosines
        raise ValueError(f"{_PREFIX}HIDDEN_DIM must be a multiple of 4, got {args.HIDDEN_DIM}")
    if args.HIDDEN_DIM % args.NHEADS:
        raise ValueError(
            f"{_PREFIX}NHEADS {args.NHEADS} does not divide {_PREFIX}HIDDEN_DIM {args.HIDDEN_DIM}"
        )
    if cfg.TEST.DETECTIONS_PER_IMAGE < 1:
        raise ValueError(f"TEST.DETECTIONS_PER_IMAGE must be >= 1, got {cfg.TEST.DETECTIONS_PER_IMAGE!r}")


@functools.lru_cache(maxsize=None)
def _default_detector_nodes():
    cfg = get_cfg()
    add_conditional_detr_config(cfg)
    return {node: dict(cfg.MODEL[node]) for node in DETECTOR_NODES}


def check_detector_keys(cfg, detector, own_node=None):
    """
    `detector` (a meta-architecture's name) reads only its own node of DETECTOR_NODES:
    a key of another detector's node set away from its default would be ignored.
    """
    for node, owner in DETECTOR_NODES.items():
        if node == own_node:
            continue
        for key, default in _default_detector_nodes()[node].items():
            value = cfg.MODEL[node][key]
            if value != default:
                raise ValueError(
                    f"MODEL.{node}.{key} is {value!r}, but {detector} does not read it: it is a key of "
                    f"{owner} only; leave it at its default {default!r}"
                )
