"""
The published checkpoints of the official Conditional DETR, DETR and Deformable DETR
implementations, MMDetection's and those on the Hugging Face hub, by the names that
`conditional-detr://NAME` accepts in MODEL.WEIGHTS.
"""

from dataclasses import dataclass
from typing import Optional

SCHEME = "conditional-detr://"
# detectron2's contiguous COCO classes, those of every COCO detection config of this project
CONVERTED_NUM_CLASSES = 80


@dataclass(frozen=True)
class OfficialCheckpoint:
    # the config, relative to configs/, whose model the checkpoint fits (None: a backbone)
    config: Optional[str]
    url: Optional[str]  # a direct download, or None when only a share page is published
    page: Optional[str] = None  # the link the official README gives, when it is not `url`
    sha256_prefix: Optional[str] = None  # checked after download when the publisher gives it
    # "detector": a checkpoint of a format of formats.py (official or MMDetection); "torchvision-resnet": the
    # ImageNet ResNet of torchvision the official models start from (backbone weights only)
    kind: str = "detector"
    # files of the same folder that the checkpoint needs beside it (transformers' config.json)
    companions: tuple = ()
    # the classes the cached conversion keeps: detectron2's 80 COCO ones, 133 COCO panoptic ones
    num_classes: int = CONVERTED_NUM_CLASSES


# The official README links Conditional DETR's weights to SharePoint share pages, which
# need a browser; its hubconf.py downloads the same files from GitHub releases, used here.
_CONDITIONAL_DETR_RELEASE = "https://github.com/DeppMeng/ConditionalDETR/releases/download/v1.0/"
_SHAREPOINT = "https://pkueducn-my.sharepoint.com/:u:/g/personal/pkucxk_pkueducn_onmicrosoft_com/"
# DETR's file names end with the first 8 hex digits of their SHA-256 (the torch.hub convention).
_DETR = "https://dl.fbaipublicfiles.com/detr/"

OFFICIAL_CHECKPOINTS = {
    "ConditionalDETR-R50-50ep": OfficialCheckpoint(
        "COCO-Detection/conditional_detr_R_50_50ep.yaml",
        _CONDITIONAL_DETR_RELEASE + "ConditionalDETR_r50_epoch50.pth",
        _SHAREPOINT + "EXaUwp6Qt29Mub0bVOExLusBlyqqyO7qCIQfVWclbOGulw?e=ILR0sI",
    ),
    "ConditionalDETR-R50-DC5-50ep": OfficialCheckpoint(
        "COCO-Detection/conditional_detr_R_50_DC5_50ep.yaml",
        _CONDITIONAL_DETR_RELEASE + "ConditionalDETR_r50dc5_epoch50.pth",
        _SHAREPOINT + "EWq9mdPp7fdCgpW9M_40xEYBiOuTyIJdzbaTAxQZ7URPQw?e=cZzb6O",
    ),
    "ConditionalDETR-R101-50ep": OfficialCheckpoint(
        "COCO-Detection/conditional_detr_R_101_50ep.yaml",
        _CONDITIONAL_DETR_RELEASE + "ConditionalDETR_r101_epoch50.pth",
        _SHAREPOINT + "EXTH01VuhzNEn9W_5Zg_dsEBkutCNBOoZYhV1ew7UVwo8Q?e=0cYF8t",
    ),
    "ConditionalDETR-R101-DC5-50ep": OfficialCheckpoint(
        "COCO-Detection/conditional_detr_R_101_DC5_50ep.yaml",
        _CONDITIONAL_DETR_RELEASE + "ConditionalDETR_r101dc5_epoch50.pth",
        _SHAREPOINT + "EbwdBQK26Q5Ev535hVKcv0wB2TJerrBieD3Fk3xGBSPa9Q?e=wKdIsm",
    ),
    "DETR-R50-500ep": OfficialCheckpoint(
        "COCO-Detection/detr_R_50_500ep.yaml",
        _DETR + "detr-r50-e632da11.pth",
        sha256_prefix="e632da11",
    ),
    "DETR-R50-DC5-500ep": OfficialCheckpoint(
        "COCO-Detection/detr_R_50_DC5_500ep.yaml",
        _DETR + "detr-r50-dc5-f0fb7ef5.pth",
        sha256_prefix="f0fb7ef5",
    ),
    "DETR-R101-500ep": OfficialCheckpoint(
        "COCO-Detection/detr_R_101_500ep.yaml",
        _DETR + "detr-r101-2c7b67e5.pth",
        sha256_prefix="2c7b67e5",
    ),
    "DETR-R101-DC5-500ep": OfficialCheckpoint(
        "COCO-Detection/detr_R_101_DC5_500ep.yaml",
        _DETR + "detr-r101-dc5-a2e86def.pth",
        sha256_prefix="a2e86def",
    ),
    # The 50-epoch DETR baselines were trained by the Conditional DETR authors and are
    # published only as share pages: no direct download is known.
    "DETR-R50-50ep": OfficialCheckpoint(
        "COCO-Detection/detr_R_50_50ep.yaml",
        None,
        _SHAREPOINT + "EWH1OGLL4N5DufAj4ncYuigB8q62uEw6I10G-d7OD7q09A?e=vKOlb6",
    ),
    "DETR-R101-50ep": OfficialCheckpoint(
        "COCO-Detection/detr_R_101_50ep.yaml",
        None,
        _SHAREPOINT + "EaGY26sT-zhPtMIVZxeT8iEBjiN24_LDZPXb8EGi9dBXpw?e=p6C8dB",
    ),
}


# Deformable DETR's README links its checkpoints to Google Drive share pages only.
_GOOGLE_DRIVE = "https://drive.google.com/file/d/"
for _name, _config, _file_id in (
    ("DeformableDETR-R50-50ep", "deformable_detr_R_50_50ep.yaml", "1nDWZWHuRwtwGden77NLM9JoWe-YisJnA"),
    ("DeformableDETR-R50-refine-50ep", "deformable_detr_R_50_refine_50ep.yaml", "1JYKyRYzUH7uo9eVfDaVCiaIGZb5YTCuI"),
    ("DeformableDETR-R50-two-stage-50ep", "deformable_detr_R_50_two_stage_50ep.yaml", "15I03A7hNTpwuLNdfuEmW9_taZMNVssEp"),
):
    OFFICIAL_CHECKPOINTS[_name] = OfficialCheckpoint(
        "COCO-Detection/" + _config, None, _GOOGLE_DRIVE + _file_id + "/view?usp=sharing"
    )


# The ImageNet initialization of the official models: torchvision's ResNets (V1 weights).
# MMDetection 3.x's release of Conditional DETR R50 (41.1 box AP); the 8 hex digits ending its
# name are the start of its SHA-256
OFFICIAL_CHECKPOINTS["mmdet/conditional-detr_r50_8xb2-50e_coco"] = OfficialCheckpoint(
    "COCO-Detection/conditional_detr_R_50_50ep.yaml",
    "https://download.openmmlab.com/mmdetection/v3.0/conditional_detr/conditional-detr_r50_8xb2-50e_coco/"
    "conditional-detr_r50_8xb2-50e_coco_20221121_180202-c83a1dc0.pth",
    sha256_prefix="c83a1dc0",
)

# DETR's panoptic models (DETR paper, Table 5), converted to detectron2's 133 COCO panoptic categories
for _name, _config, _file in (
    ("DETR-R50-panoptic", "detr_R_50_panoptic.yaml", "detr-r50-panoptic-00ce5173.pth"),
    ("DETR-R50-DC5-panoptic", "detr_R_50_DC5_panoptic.yaml", "detr-r50-dc5-panoptic-da08f1b1.pth"),
    ("DETR-R101-panoptic", "detr_R_101_panoptic.yaml", "detr-r101-panoptic-40021d53.pth"),
):
    OFFICIAL_CHECKPOINTS[_name] = OfficialCheckpoint(
        "COCO-PanopticSegmentation/" + _config, _DETR + _file, sha256_prefix=_file[-12:-4], num_classes=133
    )

# The official weights as transformers hosts them (its conversions of the files above): each
# repository's weights and the config.json beside them, which the loader checks
_HUB = "https://huggingface.co/"
for _repository, _config in (
    ("microsoft/conditional-detr-resnet-50", "conditional_detr_R_50_50ep.yaml"),
    ("facebook/detr-resnet-50", "detr_R_50_500ep.yaml"),
    ("facebook/detr-resnet-50-dc5", "detr_R_50_DC5_500ep.yaml"),
    ("facebook/detr-resnet-101", "detr_R_101_500ep.yaml"),
    ("facebook/detr-resnet-101-dc5", "detr_R_101_DC5_500ep.yaml"),
    ("SenseTime/deformable-detr", "deformable_detr_R_50_50ep.yaml"),
    ("SenseTime/deformable-detr-with-box-refine", "deformable_detr_R_50_refine_50ep.yaml"),
    ("SenseTime/deformable-detr-with-box-refine-two-stage", "deformable_detr_R_50_two_stage_50ep.yaml"),
):
    # pytorch_model.bin, which every one of them has had since its upload, and which
    # detectron2's own checkpointer can read too
    OFFICIAL_CHECKPOINTS["hf/" + _repository] = OfficialCheckpoint(
        "COCO-Detection/" + _config, f"{_HUB}{_repository}/resolve/main/pytorch_model.bin",
        f"{_HUB}{_repository}", companions=("config.json",),
    )

# detectron2 publishes R-50 converted (detectron2://ImageNetPretrained/torchvision/R-50.pkl)
# but not R-101, which the R101 configs take from here.
_TORCHVISION = "https://download.pytorch.org/models/"
OFFICIAL_CHECKPOINTS["ImageNet/torchvision-R-50"] = OfficialCheckpoint(
    None, _TORCHVISION + "resnet50-0676ba61.pth", sha256_prefix="0676ba61",
    kind="torchvision-resnet",
)
OFFICIAL_CHECKPOINTS["ImageNet/torchvision-R-101"] = OfficialCheckpoint(
    None, _TORCHVISION + "resnet101-63fe2227.pth", sha256_prefix="63fe2227",
    kind="torchvision-resnet",
)


def official_checkpoint(name):
    """The entry of `name` (scheme optional); a ValueError lists the known names."""
    name = name[len(SCHEME) :] if name.startswith(SCHEME) else name
    if name not in OFFICIAL_CHECKPOINTS:
        raise ValueError(
            f"unknown official checkpoint {SCHEME}{name}; known names: "
            + ", ".join(SCHEME + known for known in OFFICIAL_CHECKPOINTS)
        )
    return OFFICIAL_CHECKPOINTS[name]


def checkpoint_name_for_config(config_path):
    """`conditional-detr://NAME` of the official checkpoint trained with `config_path`."""
    for name, checkpoint in OFFICIAL_CHECKPOINTS.items():
        if checkpoint.config == config_path:
            return SCHEME + name
    with_checkpoint = ", ".join(c.config for c in OFFICIAL_CHECKPOINTS.values() if c.config)
    raise RuntimeError(
        f"no official checkpoint is published for config {config_path}; configs with one: "
        + with_checkpoint
    )
