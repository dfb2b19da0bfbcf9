"""
Datasets in COCO's json format named in the config, so that a user's own data needs no
Python: every (name, json_file, image_root) of DATASETS.COCO_INSTANCES is registered as
detectron2's `register_coco_instances` does, and can then be named in DATASETS.TRAIN and
DATASETS.TEST. Category ids need not be contiguous: `load_coco_json` maps the sorted ids
to 0..K-1, `thing_classes` are the json's category names, and COCOEvaluator maps the
predictions back to the json's ids and reports AP per name.
"""

import json
import os

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.data.datasets.coco import load_coco_json

__all__ = [
    "CONFIG_KEY",
    "register_coco_datasets",
    "register_coco_dataset",
    "add_coco_datasets",
    "dataset_class_names",
    "model_class_names",
    "check_instance_masks",
    "check_panoptic_files",
    "panoptic_things",
    "thing_classes",
    "check_num_classes",
]

CONFIG_KEY = "DATASETS.COCO_INSTANCES"


def _entry(entry):
    if (
        not isinstance(entry, (list, tuple))
        or len(entry) != 3
        or not all(isinstance(x, str) and x for x in entry)
    ):
        raise ValueError(
            f"{CONFIG_KEY} entries must be (name, json_file, image_root), three non-empty "
            f"strings; got {entry!r}"
        )
    return entry


def register_coco_datasets(cfg):
    """Register every dataset of DATASETS.COCO_INSTANCES; returns their names."""
    return [register_coco_dataset(*_entry(e)) for e in cfg.DATASETS.COCO_INSTANCES]


def add_coco_datasets(cfg, entries):
    """Append (name, json_file, image_root) entries to DATASETS.COCO_INSTANCES and register them."""
    entries = [tuple(_entry(tuple(e))) for e in entries or ()]
    cfg.DATASETS.COCO_INSTANCES = tuple(tuple(e) for e in cfg.DATASETS.COCO_INSTANCES) + tuple(entries)
    return [register_coco_dataset(*e) for e in entries]


def register_coco_dataset(name, json_file, image_root):
    """
    Register `name` lazily: nothing is read until `DatasetCatalog.get(name)`, which fails
    with an error naming the config key and the path when a file is missing. Registering
    the same name again with other paths replaces it; a name taken by any other dataset
    (detectron2's builtin COCO, the embedded shapes) is refused.
    """
    json_file = os.path.abspath(os.path.expanduser(json_file))
    image_root = os.path.abspath(os.path.expanduser(image_root))
    if name in DatasetCatalog.list():
        metadata = MetadataCatalog.get(name)
        if metadata.get("registered_by") != CONFIG_KEY:
            raise ValueError(
                f"{CONFIG_KEY}: dataset name {name!r} is already taken by another dataset "
                "(e.g. one of detectron2's builtin ones); choose another name"
            )
        if (metadata.json_file, metadata.image_root) == (json_file, image_root):
            return name
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: _load(name, json_file, image_root))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", registered_by=CONFIG_KEY
    )
    return name


def _check_paths(name, json_file, image_root):
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"{CONFIG_KEY}: annotation file {json_file} of dataset {name!r} does not exist")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"{CONFIG_KEY}: image folder {image_root} of dataset {name!r} does not exist")


def _load(name, json_file, image_root):
    _check_paths(name, json_file, image_root)
    _set_categories(name, json_file)  # a json without categories fails here, by name
    return load_coco_json(json_file, image_root, name)


def _set_categories(name, json_file):
    # what load_coco_json sets, read without the annotations: names in id order, sorted ids -> 0..K-1
    with open(json_file) as f:
        categories = json.load(f).get("categories") or []
    if not categories:
        raise ValueError(f"{CONFIG_KEY}: {json_file} (dataset {name!r}) has no 'categories'")
    categories = sorted(categories, key=lambda c: c["id"])
    metadata = MetadataCatalog.get(name)
    metadata.thing_classes = [c["name"] for c in categories]
    metadata.thing_dataset_id_to_contiguous_id = {c["id"]: i for i, c in enumerate(categories)}


def dataset_class_names(name):
    """The class names of a registered dataset, read from its json if it was not loaded yet; None if unknown."""
    metadata = MetadataCatalog.get(name)
    if "thing_classes" not in metadata.as_dict() and metadata.get("registered_by") == CONFIG_KEY:
        _check_paths(name, metadata.json_file, metadata.image_root)
        _set_categories(name, metadata.json_file)
    return metadata.get("thing_classes")


def model_class_names(cfg):
    """The class names of the model of `cfg`: those of DATASETS.TRAIN[0], else DATASETS.TEST[0]."""
    names = tuple(cfg.DATASETS.TRAIN) or tuple(cfg.DATASETS.TEST)
    return dataset_class_names(names[0]) if names else None


def check_num_classes(cfg, dataset_names):
    """
    Stop when MODEL.DETR.NUM_CLASSES differs from a dataset's category count,
    which the loss would otherwise meet as an index error, or not at all.
    """
    num_classes = cfg.MODEL.DETR.NUM_CLASSES
    for name in dataset_names:
        names = dataset_class_names(name)
        if names is not None and len(names) != num_classes:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise ValueError(
                f"MODEL.DETR.NUM_CLASSES is {num_classes} but dataset {name!r} has "
                f"{len(names)} categories ({shown}); set NUM_CLASSES to {len(names)}"
            )


def check_instance_masks(cfg, records):
    """
    With MODEL.MASK_ON, stop before training when the training records' annotations carry no
    masks ("segmentation"), or RLE masks that INPUT.MASK_FORMAT "polygon" cannot take.
    `records`: the dataset dicts the train loader reads (read once, for both).
    """
    if not cfg.MODEL.MASK_ON:
        return
    datasets = ", ".join(repr(name) for name in cfg.DATASETS.TRAIN)
    annotated = [(record, a) for record in records for a in record.get("annotations", ())]
    without = [record for record, a in annotated if "segmentation" not in a]
    if without:
        raise ValueError(
            f"MODEL.MASK_ON, but {len(without)} of the {len(annotated)} annotations of DATASETS.TRAIN ({datasets}) "
            f"carry no mask ('segmentation'), the first of image {without[0].get('file_name', '?')!r}: train the "
            "mask head on a dataset with instance masks, or set MODEL.MASK_ON False"
        )
    rle = next((record for record, a in annotated if isinstance(a["segmentation"], dict)), None)
    if cfg.INPUT.MASK_FORMAT == "polygon" and rle is not None:
        raise ValueError(
            f"DATASETS.TRAIN ({datasets}) has RLE masks (image {rle.get('file_name', '?')!r}), which "
            "INPUT.MASK_FORMAT 'polygon' cannot take: set INPUT.MASK_FORMAT bitmask"
        )


def thing_classes(cfg):
    """
    Whether each of the model's classes is a thing (else stuff), [NUM_CLASSES] bool: for the
    official panoptic heads' 250 COCO panoptic ids, COCO's; for a panoptic dataset
    (DATASETS.TEST[0], else TRAIN[0]), its metadata's thing ids; else every class.
    """
    num_classes = cfg.MODEL.DETR.NUM_CLASSES
    if num_classes == 250:
        things = {c["id"] for c in COCO_CATEGORIES if c["isthing"]}
        return torch.tensor([i in things for i in range(num_classes)])
    names = tuple(cfg.DATASETS.TEST) or tuple(cfg.DATASETS.TRAIN)
    metadata = MetadataCatalog.get(names[0]) if names else None
    if metadata is None or "stuff_dataset_id_to_contiguous_id" not in metadata.as_dict():
        return torch.ones(num_classes, dtype=torch.bool)
    things = set(metadata.thing_dataset_id_to_contiguous_id.values())
    return torch.tensor([i in things for i in range(num_classes)])


def check_panoptic_files(dataset_names):
    """
    Stop before training when a panoptic dataset's JSON and PNGs disagree where reading the
    JSON tells: a PNG that is missing, a segment of a category the JSON does not list. That
    a PNG holds exactly the segments its JSON lists, the mapper checks as it reads it.
    """
    for name in dataset_names:
        metadata = MetadataCatalog.get(name)
        if "panoptic_json" not in metadata.as_dict():
            continue
        if not os.path.isfile(metadata.panoptic_json):
            DatasetCatalog.get(name)  # a dataset drawn when first loaded (the shapes) writes its files now
        with open(metadata.panoptic_json) as f:
            panoptic = json.load(f)
        categories = {c["id"] for c in panoptic["categories"]}
        for annotation in panoptic["annotations"]:
            png = os.path.join(metadata.panoptic_root, annotation["file_name"])
            if not os.path.isfile(png):
                raise ValueError(f"dataset {name!r}: {png}, the PNG of image {annotation['image_id']}, is missing")
            for segment in annotation["segments_info"]:
                if segment["category_id"] not in categories:
                    raise ValueError(
                        f"dataset {name!r}: {png}: segment {segment['id']} has category {segment['category_id']}, "
                        f"which {metadata.panoptic_json} does not list"
                    )


def panoptic_things(dataset_name):
    """
    The name of a metadata entry for COCOEvaluator on the things of a panoptic dataset of
    detectron2's standard registration: its instances JSON holds the things alone, so the
    class names (its per-category table) are the things', in the order of their ids, while
    the contiguous ids of the model's predictions stay those of the one space of things and
    stuff.
    """
    name = f"{dataset_name}_things"
    panoptic = MetadataCatalog.get(dataset_name)
    things = sorted(panoptic.thing_dataset_id_to_contiguous_id.items())
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)  # the panoptic dataset may have been registered again
    MetadataCatalog.get(name).set(
        json_file=panoptic.json_file,
        thing_classes=[panoptic.thing_classes[contiguous] for _, contiguous in things],
        thing_dataset_id_to_contiguous_id=dict(things),
        evaluator_type="coco",
    )
    return name
