"""
The registry of foreign checkpoint formats: the state dicts of other implementations that
the checkpointer, the converter tool and the models' own `load_state_dict` convert to this
project's names. Each format recognizes its state dicts by their keys, converts them, and
names the classes of its converted head (see `official.OfficialFormat`). Adding a format is
one module beside this one and one line here.
"""
from . import huggingface, mmdetection, official
from .class_heads import class_head_keys

__all__ = ["FORMATS", "check_fits", "describe", "load", "recognize", "unwrap"]

FORMATS = (
    official.CONDITIONAL_DETR, official.DETR, official.DEFORMABLE_DETR, official.DETR_PANOPTIC,
    mmdetection.CONDITIONAL_DETR, mmdetection.DETR, mmdetection.DEFORMABLE_DETR,
    huggingface.CONDITIONAL_DETR, huggingface.DETR, huggingface.DEFORMABLE_DETR,
)


def recognize(state_dict):
    """The format of FORMATS that recognizes `state_dict`, or None for this project's own."""
    found = [fmt for fmt in FORMATS if fmt.recognizes(state_dict)]
    if len(found) > 1:
        raise ValueError(f"a state dict recognized by several formats: {[fmt.name for fmt in found]}")
    return found[0] if found else None


def unwrap(contents):
    """
    The state dict, the class names (or None) and the metadata ({} when none) of a checkpoint
    file's contents: this project's and the official ones hold the state dict under "model",
    MMDetection's under "state_dict", with its classes and config in "meta"; a bare state dict
    is its own.
    """
    if isinstance(contents, dict) and isinstance(contents.get("state_dict"), dict) and "meta" in contents:
        meta = contents["meta"] if isinstance(contents["meta"], dict) else {}
        classes = (meta.get("dataset_meta") or {}).get("classes")
        return contents["state_dict"], list(classes) if classes else None, meta
    if isinstance(contents, dict) and isinstance(contents.get("model"), dict):
        return contents["model"], contents.get("class_names"), contents.get("meta") or {}
    return contents, None, {}


def describe():
    """The formats of the registry, for help texts and errors."""
    return ", ".join(f"{fmt.repository} ({fmt.architecture})" for fmt in FORMATS)


def load(path):
    """The format and state dict of a checkpoint file of one of FORMATS; a ValueError names the file."""
    if huggingface.is_pretrained(path):
        state_dict, config = huggingface.read_pretrained(path)
        checkpoint = {"model": state_dict, "meta": {"config": config}}
    else:
        checkpoint = official.read_file(path)
    state_dict, _, meta = unwrap(checkpoint)
    source_format = recognize(state_dict) if isinstance(state_dict, dict) else None
    if source_format is None:
        raise ValueError(f"{path}: not a checkpoint of a known format; known formats: {describe()}")
    source_format.check_meta(meta, path)
    return source_format, state_dict


def check_fits(model, state_dict, source, hint="check the layers, queries, widths, MODEL.MASK_ON and "
               "MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE / TWO_STAGE"):
    """
    A converted checkpoint of another implementation (`source` names it in errors) has
    exactly the model's keys and shapes: where it does not, its architecture differs
    (layers, box refinement, two-stage, sampling points...), and loading the rest, which
    detectron2 does with a warning, would give a model that computes something else. Class
    heads may differ in rows: fitting them to the model's classes is the checkpointer's. A
    detector's checkpoint fits a model with the mask head, which keeps its initialization.
    """
    # BatchNorm counters and extra query groups are the model's own, never in such files
    model_state = {
        k: v for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked") and not k.startswith("group_query_embed.")
    }
    does_not_fit = f"{source} does not fit MODEL.META_ARCHITECTURE {type(model).__name__} as configured"
    # a detector's checkpoint in a model with the mask head: the head starts from its initialization
    missing = sorted(k for k in model_state.keys() - state_dict.keys() if not k.startswith(official.MASK_HEAD_PREFIXES))
    unexpected = sorted(state_dict.keys() - model_state.keys())
    if missing or unexpected:
        raise ValueError(
            f"{does_not_fit}: {len(missing)} of the model's keys are missing (such as {missing[:2]}) and "
            f"{len(unexpected)} are not the model's (such as {unexpected[:2]}); {hint}"
        )
    class_keys = set(class_head_keys(state_dict))
    resized = [
        f"{k} {tuple(state_dict[k].shape)} (the model's: {tuple(v.shape)})" for k, v in model_state.items()
        if k in state_dict and k not in class_keys and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if resized:
        raise ValueError(f"{does_not_fit}: {len(resized)} tensors differ in shape, such as {'; '.join(resized[:2])}; {hint}")
