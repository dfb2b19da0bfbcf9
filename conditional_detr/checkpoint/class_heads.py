"""
Class heads in checkpoints: which keys they are, COCO's classes, and the policy of
MODEL.WEIGHTS_CLASS_HEAD (what the class heads of a checkpoint become when its classes are
not the model's).

A class head is any checkpoint entry whose last module is `class_embed`:
`class_embed.weight` (Conditional DETR, DETR), `class_embed.3.bias` (one head per
decoder layer) or `transformer.decoder.class_embed.3.weight` (an alias of the same
tensors). Rows are classes; a softmax head's last row is "no object". Two-stage Deformable
DETR's last head scores the encoder's proposals as one class-agnostic foreground, its row
0: that row is kept whatever the classes, the others follow the behaviour.
"""

import re

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

__all__ = [
    "BEHAVIOURS",
    "CONFIG_KEY",
    "ClassMappingError",
    "coco_category_id_names",
    "coco_panoptic_names",
    "MissingClassHeadError",
    "COCO_CLASS_NAMES",
    "check_behaviour",
    "class_head_keys",
    "coco_class_names",
    "coco_contiguous_to_category_id",
    "fine_tune_class_heads",
    "proposal_head_keys",
    "same_names",
]

CONFIG_KEY = "MODEL.WEIGHTS_CLASS_HEAD"
BEHAVIOURS = ("keep", "reinit", "match_names")
# detectron2's 80 contiguous COCO classes: those of official and model-zoo checkpoints once converted
COCO_CLASS_NAMES = tuple(c["name"] for c in COCO_CATEGORIES if c["isthing"])

# one head (Conditional DETR, DETR) or one per decoder layer, also listed under the decoder
# (Deformable DETR)
_CLASS_HEAD_KEY = re.compile(r"(^|\.)class_embed(\.\d+)?\.(weight|bias)$")


class ClassMappingError(ValueError):
    """A format's class head cannot become the model's classes by conversion alone."""


class MissingClassHeadError(ValueError):
    """A state dict to convert has no class head (detectron2 drops one whose class count is not the model's)."""


def coco_class_names(num_classes):
    """The names of a converted head's classes where it has detectron2's 80 COCO ones, else None."""
    return COCO_CLASS_NAMES if num_classes == len(COCO_CLASS_NAMES) else None


def coco_category_id_names():
    """The 91 names of heads indexed by COCO category id (the official ones), "N/A" where no category is."""
    names = {c["id"]: c["name"] for c in COCO_CATEGORIES if c["isthing"]}
    return tuple(names.get(i, "N/A") for i in range(max(names) + 1))


def coco_panoptic_names():
    """
    The 250 names of the official panoptic heads, indexed by COCO panoptic category id
    (things 1-90 as COCO's, stuff 92-200), "N/A" where no category is.
    """
    names = {c["id"]: c["name"] for c in COCO_CATEGORIES}
    return tuple(names.get(i, "N/A") for i in range(250))


def coco_contiguous_to_category_id():
    """COCO category id of each of detectron2's 80 contiguous classes, in order."""
    return [c["id"] for c in COCO_CATEGORIES if c["isthing"]]


def check_behaviour(behaviour):
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"{CONFIG_KEY} must be one of {BEHAVIOURS}, got {behaviour!r}")
    return behaviour


def class_head_keys(state_dict):
    """The keys of every class head's weight and bias."""
    return [k for k in state_dict if _CLASS_HEAD_KEY.search(k)]


def proposal_head_keys(state_dict):
    """
    Two-stage Deformable DETR's last class head scores the encoder's proposals as one
    class-agnostic foreground, its logit 0, whatever the class count: its keys, or [].
    """
    if "transformer.enc_output.weight" not in state_dict:
        return []
    heads = [k for k in class_head_keys(state_dict) if k.startswith("class_embed.")]
    last = max(int(k.split(".")[1]) for k in heads)
    return [k for k in class_head_keys(state_dict) if k.endswith((f"class_embed.{last}.weight", f"class_embed.{last}.bias"))]


def _normalized(name):
    return name.strip().lower()


def same_names(a, b):
    return [_normalized(x) for x in a] == [_normalized(x) for x in b]


def fine_tune_class_heads(
    state_dict, model_state, behaviour, model_names=None, checkpoint_names=None, model_no_object=0
):
    """
    Replace the class heads of `state_dict` (a checkpoint's) by tensors of the model's shape.

    Args:
        state_dict: the checkpoint's state dict, changed in place.
        model_state: the model's state dict, holding its own initialization of the heads.
        behaviour: "reinit" (every row from the model) or "match_names" (the checkpoint's row
            of every model class whose name, case and surrounding spaces aside, it has; the
            model's row for the others; a softmax head's "no object" row from the checkpoint
            when it has one).
        model_names / checkpoint_names: class names in row order (needed by "match_names").
        model_no_object: 1 when the model's heads end with a "no object" row.
    Returns:
        a one-line summary of what was kept.
    """
    keys = [k for k in class_head_keys(state_dict) if k in model_state]
    proposal_keys = set(proposal_head_keys(state_dict))

    def keep_proposal_foreground(key, head):
        if key in proposal_keys:
            head[0] = state_dict[key][0].to(head.dtype)
        return head

    if behaviour == "reinit":
        for key in keys:
            state_dict[key] = keep_proposal_foreground(key, model_state[key].detach().clone())
        kept = " (the proposal head's foreground row kept)" if proposal_keys else ""
        return f"re-initialized the class head ({len(keys)} tensors){kept}, kept everything else"
    if behaviour != "match_names":
        raise ValueError(f"fine_tune_class_heads: behaviour must be 'reinit' or 'match_names', got {behaviour!r}")

    rows = {_normalized(name): j for j, name in reversed(list(enumerate(checkpoint_names)))}
    pairs = [(i, rows[_normalized(name)]) for i, name in enumerate(model_names) if _normalized(name) in rows]
    for key in keys:
        source, head = state_dict[key], model_state[key].detach().clone()
        checkpoint_no_object = source.shape[0] - len(checkpoint_names)
        if checkpoint_no_object not in (0, 1) or head.shape[1:] != source.shape[1:]:
            raise ValueError(
                f"checkpoint field {key!r} of shape {tuple(source.shape)} does not fit "
                f"{len(checkpoint_names)} class names and the model's {tuple(head.shape)}"
            )
        if pairs:
            model_rows, source_rows = zip(*pairs)
            head[list(model_rows)] = source[list(source_rows)].to(head.dtype)
        if model_no_object and checkpoint_no_object:
            head[-1] = source[-1].to(head.dtype)
        state_dict[key] = keep_proposal_foreground(key, head)
    kept = ", ".join(model_names[i] for i, _ in pairs) or "none"
    initialized = [name for i, name in enumerate(model_names) if i not in dict(pairs)]
    return (
        f"kept the class-head rows of {len(pairs)} of {len(model_names)} classes by name ({kept}); "
        f"initialized {len(initialized)} ({', '.join(initialized) or 'none'})"
    )
