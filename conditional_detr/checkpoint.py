from detectron2.checkpoint import DetectionCheckpointer

from .tools.convert_official import convert_state_dict, is_official_state_dict


class ConditionalDETRCheckpointer(DetectionCheckpointer):
    """
    DetectionCheckpointer that also loads official checkpoints (converted on the
    fly) and refuses a checkpoint whose class count differs from the model's,
    which detectron2 would otherwise skip with only a warning.
    """

    def _load_file(self, filename):
        checkpoint = super()._load_file(filename)
        state_dict = checkpoint.get("model", {})
        if is_official_state_dict(state_dict):
            try:
                state_dict = convert_state_dict(state_dict, self._num_classes())
            except ValueError as e:
                raise ValueError(f"{filename}: {e}") from e
            checkpoint = {"model": state_dict, "matching_heuristics": False}
        self._check_class_count(checkpoint.get("model", {}), filename)
        return checkpoint

    def _num_classes(self):
        return getattr(self.model, "num_classes", None)

    def _check_class_count(self, state_dict, filename):
        num_classes = self._num_classes()
        class_weight = state_dict.get("class_embed.weight")
        if num_classes is None or class_weight is None or class_weight.shape[0] == num_classes:
            return
        raise ValueError(
            f"{filename}: checkpoint field 'class_embed.weight' has {class_weight.shape[0]} classes but "
            f"MODEL.CONDITIONAL_DETR.NUM_CLASSES is {num_classes}; set NUM_CLASSES to match, or "
            "convert the checkpoint for this class count"
        )
