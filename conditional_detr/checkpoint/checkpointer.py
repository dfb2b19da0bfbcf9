"""The checkpointer of the package's detectors: foreign formats converted, class heads fitted."""
import logging
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..data.datasets import model_class_names
from . import formats, huggingface
from .catalog import SCHEME, official_checkpoint
from .official import MASK_HEAD_PREFIXES
from .class_heads import (
    COCO_CLASS_NAMES,
    CONFIG_KEY as CLASS_HEAD_KEY,
    ClassMappingError,
    check_behaviour,
    class_head_keys,
    fine_tune_class_heads,
    same_names,
)


class ConditionalDETRCheckpointer(DetectionCheckpointer):
    """
    DetectionCheckpointer that also loads the checkpoints of the formats of `formats.py`
    (the official implementations', converted on the fly), refuses a checkpoint whose class count differs
    from the model's, which detectron2 would otherwise skip with only a warning, unless
    `class_head` (MODEL.WEIGHTS_CLASS_HEAD) says how to fine-tune to
    the model's classes, and stops with an error naming a file that is not a checkpoint.

    Saved checkpoints hold the model's `class_names`, so that a later fine-tuning can match
    classes by name; official and model-zoo checkpoints have COCO's names.
    """

    def __init__(self, model, save_dir="", *, class_names=None, class_head="keep", cfg=None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.cfg = cfg  # the model's config, checked against the settings a checkpoint describes
        self.class_names = list(class_names) if class_names is not None else None
        self.class_head = check_behaviour(class_head)
        self._loading = None

    @classmethod
    def from_config(cls, cfg, model, save_dir="", **kwargs):
        """The checkpointer of `model` with the class-head behaviour of `cfg` and its dataset's class names."""
        return cls(
            model,
            save_dir,
            class_names=model_class_names(cfg),
            class_head=cfg.MODEL.WEIGHTS_CLASS_HEAD,
            cfg=cfg,
            **kwargs,
        )

    def save(self, name, **kwargs):
        if self.class_names is not None:
            kwargs.setdefault("class_names", self.class_names)
        super().save(name, **kwargs)

    def load(self, path, *args, **kwargs):
        if isinstance(path, str) and os.path.isdir(path):  # a transformers save_pretrained folder
            path = huggingface.weights_file(path)
        self._loading = path  # the name as given: a conditional-detr:// one tells COCO's classes
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None

    def _load_file(self, filename):
        checkpoint = self._read(filename)
        state_dict = checkpoint["model"]
        checkpoint_names = checkpoint.get("class_names")
        source_format = formats.recognize(state_dict)
        if source_format is not None:
            self._check_architecture(source_format, filename)
            source_format.check_meta(checkpoint.get("meta", {}), filename, self.cfg)
            state_dict, format_names = self._convert(source_format, state_dict, filename)
            formats.check_fits(self.model, state_dict, f"{filename}: this {source_format.repository} checkpoint")
            checkpoint_names = checkpoint_names or format_names  # the names the file stores come first
            checkpoint = {"model": state_dict, "matching_heuristics": False}
        elif checkpoint_names is None and self._loading_model_zoo_detector():
            checkpoint_names = COCO_CLASS_NAMES
        self._fit_class_heads(state_dict, checkpoint_names, filename)
        if getattr(self.model, "mask_on", False) and not any(k.startswith(MASK_HEAD_PREFIXES) for k in state_dict):
            logging.getLogger(__name__).info(
                f"{filename}: a detector's checkpoint, without the mask head: the mask head (bbox_attention, "
                "mask_head) starts from its initialization"
            )
        return checkpoint

    def _read(self, filename):
        if huggingface.is_pretrained(filename):
            state_dict, config = huggingface.read_pretrained(filename)
            return {"model": state_dict, "class_names": huggingface.class_names_of(config), "meta": {"config": config}}
        try:
            checkpoint = super()._load_file(filename)
        except Exception as e:
            raise ValueError(
                f"{filename}: cannot read this checkpoint (a truncated file, or not a checkpoint?): "
                f"{type(e).__name__}: {e}"
            ) from e
        contents = checkpoint.get("model") if isinstance(checkpoint, dict) else None
        state_dict, class_names, meta = formats.unwrap(contents)
        if state_dict is not contents:  # a container of another implementation
            checkpoint = {"model": state_dict, "class_names": class_names, "meta": meta}
        if not isinstance(state_dict, dict) or not all(
            isinstance(v, torch.Tensor) or hasattr(v, "shape") for v in state_dict.values()
        ):
            raise ValueError(
                f"{filename}: not a checkpoint: expected a state dict of tensors, or a dict "
                "with one under 'model'"
            )
        return checkpoint

    def _num_classes(self):
        return getattr(self.model, "num_classes", None)

    def _check_architecture(self, source_format, filename):
        architecture = type(self.model).__name__
        known = {fmt.architecture for fmt in formats.FORMATS}
        if architecture in known and source_format.architecture != architecture:
            raise ValueError(
                f"{filename}: an official {source_format.name} checkpoint cannot load into "
                f"MODEL.META_ARCHITECTURE {architecture}"
            )

    def _convert(self, source_format, state_dict, filename):
        """The converted state dict, and the names of its classes where the format knows them."""
        num_classes = self._num_classes()
        try:
            return source_format.convert(state_dict, num_classes), source_format.class_names(num_classes)
        except ClassMappingError as e:
            if self.class_head == "keep":
                raise ValueError(f"{filename}: {e}; {self._fine_tuning_hint()}") from e
        # fine-tuning to other classes starts from COCO's 80, whose names are known
        coco = len(COCO_CLASS_NAMES)
        return source_format.convert(state_dict, coco), source_format.class_names(coco)

    def _loading_model_zoo_detector(self):
        if not isinstance(self._loading, str) or not self._loading.startswith(SCHEME):
            return False
        try:
            return official_checkpoint(self._loading[len(SCHEME) :]).kind == "detector"
        except (KeyError, ValueError):
            return False

    @staticmethod
    def _fine_tuning_hint():
        return f"to fine-tune to the model's classes set {CLASS_HEAD_KEY} to 'reinit' or 'match_names'"

    def _fit_class_heads(self, state_dict, checkpoint_names, filename):
        model_state = self.model.state_dict()
        keys = [k for k in class_head_keys(state_dict) if k in model_state]
        if not keys:
            return
        fits = all(state_dict[k].shape[0] == model_state[k].shape[0] for k in keys)
        names_differ = (
            checkpoint_names is not None
            and self.class_names is not None
            and not same_names(checkpoint_names, self.class_names)
        )
        if fits and not names_differ:
            return
        logger = logging.getLogger(__name__)
        if self.class_head == "keep":
            if not fits:
                self._raise_class_count_error(state_dict[keys[0]], keys[0], filename)
            logger.warning(
                f"{filename}: the checkpoint's classes are not the model's; its class head is "
                f"loaded as it is ({CLASS_HEAD_KEY} 'keep')"
            )
            return
        if self.class_head == "match_names" and checkpoint_names is None:
            raise ValueError(
                f"{filename} stores no class names, which {CLASS_HEAD_KEY} 'match_names' needs: "
                "use a checkpoint saved by this project's training, an official checkpoint or a "
                "conditional-detr:// name, or 'reinit'"
            )
        if self.class_head == "match_names" and self.class_names is None:
            raise ValueError(
                f"{CLASS_HEAD_KEY} 'match_names' needs the model's class names, the 'thing_classes' "
                "of the metadata of DATASETS.TRAIN[0] (or DATASETS.TEST[0]), which has none"
            )
        no_object = getattr(self.model, "num_class_logits", 0) - (self._num_classes() or 0)
        summary = fine_tune_class_heads(
            state_dict, model_state, self.class_head, self.class_names, checkpoint_names, no_object
        )
        logger.info(f"Class head from {filename} ({CLASS_HEAD_KEY} {self.class_head!r}): {summary}")

    def _raise_class_count_error(self, class_weight, key, filename):
        num_classes = self._num_classes()
        logits = getattr(self.model, "num_class_logits", num_classes)
        # DETR-style heads (softmax loss) end with a "no object" logit
        no_object = logits - num_classes
        suffix = f" + no-object ({class_weight.shape[0]} logits)" if no_object else ""
        raise ValueError(
            f"{filename}: checkpoint field {key!r} has {class_weight.shape[0] - no_object} "
            f"classes{suffix} but MODEL.DETR.NUM_CLASSES is {num_classes}; set NUM_CLASSES "
            f"to match, convert the checkpoint for this class count, or {self._fine_tuning_hint()}"
        )
