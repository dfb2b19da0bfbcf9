from detectron2.checkpoint import DetectionCheckpointer

from .modeling import DETR, ConditionalDETR, DeformableDETR
from .tools.convert_official import convert_state_dict, is_official_state_dict, official_format

# the official format each meta-architecture loads
OFFICIAL_FORMATS = {ConditionalDETR: "conditional_detr", DETR: "detr", DeformableDETR: "deformable_detr"}


class ConditionalDETRCheckpointer(DetectionCheckpointer):
    """
    DetectionCheckpointer that also loads official Conditional DETR and DETR
    checkpoints (converted on the fly) and refuses a checkpoint whose class count
    differs from the model's, which detectron2 would otherwise skip with only a warning.
    """

    def _load_file(self, filename):
        checkpoint = super()._load_file(filename)
        state_dict = checkpoint.get("model", {})
        if is_official_state_dict(state_dict):
            self._check_official_format(state_dict, filename)
            try:
                state_dict = convert_state_dict(state_dict, self._num_classes())
            except ValueError as e:
                raise ValueError(f"{filename}: {e}") from e
            checkpoint = {"model": state_dict, "matching_heuristics": False}
        self._check_class_count(checkpoint.get("model", {}), filename)
        return checkpoint

    def _num_classes(self):
        return getattr(self.model, "num_classes", None)

    def _check_official_format(self, state_dict, filename):
        expected = OFFICIAL_FORMATS.get(type(self.model))
        found = official_format(state_dict)
        if expected is not None and found != expected:
            raise ValueError(
                f"{filename}: an official {found} checkpoint cannot load into "
                f"MODEL.META_ARCHITECTURE {type(self.model).__name__}"
            )

    def _check_class_count(self, state_dict, filename):
        num_classes = self._num_classes()
        class_weight = state_dict.get("class_embed.weight")
        logits = getattr(self.model, "num_class_logits", num_classes)
        if num_classes is None or class_weight is None or class_weight.shape[0] == logits:
            return
        # DETR-style heads (softmax loss) end with a "no object" logit
        no_object = logits - num_classes
        suffix = f" + no-object ({class_weight.shape[0]} logits)" if no_object else ""
        raise ValueError(
            f"{filename}: checkpoint field 'class_embed.weight' has {class_weight.shape[0] - no_object} "
            f"classes{suffix} but MODEL.CONDITIONAL_DETR.NUM_CLASSES is {num_classes}; set NUM_CLASSES "
            "to match, or convert the checkpoint for this class count"
        )
