"""
The registry of foreign checkpoint formats: the state dicts of other implementations that
the checkpointer, the converter tool and the models' own `load_state_dict` convert to this
project's names. Each format recognizes its state dicts by their keys, converts them, and
names the classes of its converted head (see `official.OfficialFormat`). Adding a format is
one module beside this one and one line here.
"""
from . import huggingface, mmdetection, official

__all__ = ["FORMATS", "describe", "load", "recognize", "unwrap"]

FORMATS = (
    official.CONDITIONAL_DETR, official.DETR, official.DEFORMABLE_DETR,
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
