"""
What the package's detectors share: the set-prediction detector (losses, inference,
detectron2's inputs and outputs) and, for DETR and Conditional DETR, the single-level one
(one feature map, DETR's encoder, one pair of heads). Each detector's own decoder and
meta-architecture are in a file of its own: detr.py, conditional_detr.py, deformable_detr.py.
"""
import contextlib
import math

import torch
from detectron2.modeling import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from .. import ops
from ..checkpoint.class_heads import MissingClassHeadError
from ..checkpoint.formats import check_fits, recognize as recognize_format
from ..config_checks import check_detector_keys, check_shared_keys
from ..data.datasets import thing_classes
from .backbone import build_resnet_like_torchvision, features_with_padding_masks
from .compiled_backbone import FrozenWeightsCompiler
from .box_ops import box_xyxy_to_cxcywh
from .criterion import SetCriterion
from .mask_head import MASK_FEATURES, AttentionMap, MaskHeadSmallConv, instance_masks
from .matcher import CLASS_LOSSES, HungarianMatcher
from .position_encoding import PositionEmbeddingSine
from .postprocess import detections, full_image_masks, panoptic_queries, panoptic_segmentation
from .transformer import MLP, Transformer, TransformerEncoder


INFERENCE_PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def config_choice(cfg, key, choices, namespace="MODEL.DETR"):
    """The value of <namespace>.<key>, which must be one of `choices`."""
    node = cfg
    for part in namespace.split("."):
        node = node[part]
    value = node.get(key)
    if value not in choices:
        raise ValueError(f"{namespace}.{key} must be one of {tuple(choices)}, got {value!r}")
    return value


def as_float32(outputs):
    """`outputs` with every floating tensor in float32, through nested dicts, lists and tuples."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: as_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(as_float32(v) for v in outputs)
    return outputs


def heads_in_float32(hs):
    """
    Autocast off for the class and box heads: they are a sliver of the compute, and boxes
    as bfloat16 sums of offsets and inverse-sigmoid references are off by a pixel or more.
    Call them on `as_float32` inputs.
    """
    return torch.autocast(hs.device.type, enabled=False)


class SetPredictionDetector(nn.Module):
    """
    What every detector of the package shares: the MODEL.DETR keys,
    class and box heads trained by the Hungarian set losses, inference, and detectron2's
    inputs and outputs. Subclasses build the backbone, transformer and heads, and return
    the official output dict from `forward_outputs`.

    With MODEL.DETR.CLASS_LOSS "focal" the class head has NUM_CLASSES
    logits, trained with the sigmoid focal loss, and inference keeps the top-k
    (query, class) pairs; with "softmax" it has one more, "no object", trained with
    cross-entropy, and inference keeps the best class of each query, as in DETR.
    """

    # the node of DETECTOR_NODES (conditional_detr/config.py) whose keys this detector reads
    own_config_node = None

    def __init__(self, cfg):
        check_shared_keys(cfg)
        check_detector_keys(cfg, type(self).__name__, self.own_config_node)
        super().__init__()
        args = cfg.MODEL.DETR
        self.num_classes = args.NUM_CLASSES
        self.num_queries = args.NUM_OBJECT_QUERIES
        self.query_groups = args.QUERY_GROUPS
        self.num_topk = cfg.TEST.DETECTIONS_PER_IMAGE
        self.deep_supervision = args.DEEP_SUPERVISION
        self.class_loss = config_choice(cfg, "CLASS_LOSS", CLASS_LOSSES)
        # DETR's mask head (mask_head.py) on the last decoder layer, for every detector
        self.mask_on = cfg.MODEL.MASK_ON
        self.train_mask_head_only = args.TRAIN_MASK_HEAD_ONLY
        if self.train_mask_head_only and not self.mask_on:
            raise ValueError("MODEL.DETR.TRAIN_MASK_HEAD_ONLY trains the mask head alone: it needs MODEL.MASK_ON True")
        self.panoptic_on = args.PANOPTIC_ON
        if self.panoptic_on and not self.mask_on:
            raise ValueError("MODEL.DETR.PANOPTIC_ON segments with the mask head: it needs MODEL.MASK_ON True")
        self.panoptic_threshold, self.panoptic_min_area = args.PANOPTIC_THRESHOLD, args.PANOPTIC_MIN_AREA
        # not persistent: the dataset's, not the checkpoint's
        self.register_buffer("thing_classes", thing_classes(cfg) if self.panoptic_on else torch.zeros(0, dtype=torch.bool), False)

        matcher = HungarianMatcher(
            cost_class=args.CLASS_COST, cost_bbox=args.L1_COST, cost_giou=args.GIOU_COST,
            focal_alpha=args.FOCAL_ALPHA, focal_gamma=args.FOCAL_GAMMA, class_loss=self.class_loss,
        )
        weight_dict = {"loss_ce": args.CLASS_WEIGHT, "loss_bbox": args.L1_WEIGHT, "loss_giou": args.GIOU_WEIGHT}
        losses = ("labels", "boxes")
        if self.mask_on:
            weight_dict.update(loss_mask=args.MASK_WEIGHT, loss_dice=args.DICE_WEIGHT)
            losses += ("masks",)
        if self.deep_supervision:
            # as the official dict: the mask terms listed for every layer too, computed for the last
            layer_weights = dict(weight_dict)
            for i in range(args.DEC_LAYERS - 1):
                weight_dict.update({f"{k}_{i}": v for k, v in layer_weights.items()})
        self.criterion = SetCriterion(
            self.num_classes, matcher, weight_dict, args.FOCAL_ALPHA, args.FOCAL_GAMMA,
            class_loss=self.class_loss, eos_coef=args.NO_OBJECT_WEIGHT, num_groups=self.query_groups, losses=losses,
        )

        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)
        self.memory_format = torch.channels_last if cfg.MODEL.BACKBONE.CHANNELS_LAST else torch.contiguous_format
        self.backbone_compiler = FrozenWeightsCompiler() if cfg.MODEL.BACKBONE.COMPILE_FOR_INFERENCE else None
        # inference under autocast (TEST.AMP), post-processing in float32
        self.inference_dtype = None
        if cfg.TEST.AMP.ENABLED:
            self.inference_dtype = INFERENCE_PRECISIONS[config_choice(cfg, "PRECISION", INFERENCE_PRECISIONS, "TEST.AMP")]

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """
        A state dict of another implementation (checkpoint/formats.py) is converted first, so
        that detectron2's own DetectionCheckpointer and DefaultPredictor load official
        checkpoints correctly too, and refused where it does not fit the model (detectron2
        would load the rest with a warning). Where its class heads did not reach here
        (detectron2 drops the tensors whose shape is not the model's, such as 91 COCO-id
        logits against 80 classes), loading stops instead of leaving them at their
        initialization.
        """
        source_format = recognize_format(state_dict)
        if source_format is not None:
            try:
                state_dict = source_format.convert(state_dict, self.num_classes)
            except MissingClassHeadError as e:
                raise ValueError(
                    f"a {source_format.repository} state dict without its class heads, which detectron2's "
                    f"DetectionCheckpointer (and DefaultPredictor) leave out when their class count is not "
                    f"the model's {self.num_classes}: load it with "
                    "conditional_detr.checkpoint.ConditionalDETRCheckpointer, as train_net.py and the tools "
                    "do, or convert it once with python -m conditional_detr.tools.convert_official"
                ) from e
            check_fits(self, state_dict, f"this {source_format.repository} state dict")
        self.forget_compiled_backbone()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def run_backbone(self, images):
        """The backbone's features of a batch tensor (compiled in inference with MODEL.BACKBONE.COMPILE_FOR_INFERENCE)."""
        if self.backbone_compiler is None:
            return self.backbone(images)
        return self.backbone_compiler(self.backbone, images)

    def forget_compiled_backbone(self):
        # the compiled backbone holds the weights as constants: compiled again at the next inference
        if getattr(self, "backbone_compiler", None) is not None:
            self.backbone_compiler.forget()

    def train(self, mode=True):
        if mode:  # training changes the weights; eval() keeps what was compiled for them
            self.forget_compiled_backbone()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.forget_compiled_backbone()
        return super()._apply(fn, *args, **kwargs)

    def init_class_head(self, class_embed):
        if self.class_loss == "focal":
            # focal-loss prior: every class starts at probability 0.01
            prior_prob = 0.01
            nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))

    @property
    def num_class_logits(self):
        return self.num_classes + (1 if self.class_loss == "softmax" else 0)

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs):
        # the official model pads to the batch's largest size with zeros after
        # normalization, with no size divisibility
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images)
        return ImageList(images.tensor.contiguous(memory_format=self.memory_format), images.image_sizes)

    def use_memory_format(self, *convolutional_modules):
        """Puts the convolutions' weights in MODEL.BACKBONE.CHANNELS_LAST's format."""
        for module in convolutional_modules:
            module.to(memory_format=self.memory_format)

    def forward_outputs(self, images: ImageList, lazy_masks=False):
        """
        Returns the official output dict: "pred_logits" [batch, num_queries, num_class_logits],
        "pred_boxes" [batch, num_queries, 4] normalized cxcywh, and "aux_outputs",
        the same for every decoder layer but the last. With MODEL.MASK_ON, "pred_masks"
        [batch, num_queries, H/4, W/4], or with `lazy_masks` the "mask_predictor" of
        `mask_predictor` for the queries training and inference need.
        """
        raise NotImplementedError

    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        if self.training:
            outputs = self.forward_outputs(images, lazy_masks=True)
            if not self.deep_supervision:
                outputs.pop("aux_outputs")
            targets = self.prepare_targets(batched_inputs, images.image_sizes)
            # matching and losses in float32 under autocast too: GIoU and the L1 distances of
            # boxes in [0, 1] lose what bfloat16's 8 bits cannot hold
            with torch.autocast(self.device.type, enabled=False):
                losses = self.criterion(as_float32(outputs), targets)
            return {k: v * self.criterion.weight_dict[k] for k, v in losses.items()}

        # without TEST.AMP the caller's autocast, if any, stays in force; the heads, and so
        # the post-processing, are float32 either way
        precision = (
            contextlib.nullcontext() if self.inference_dtype is None
            else torch.autocast(self.device.type, dtype=self.inference_dtype)
        )
        with precision:
            outputs = self.forward_outputs(images, lazy_masks=True)
        results = self.inference(outputs["pred_logits"], outputs["pred_boxes"], images.image_sizes)
        processed = []
        for i, (result, input_per_image, image_size) in enumerate(zip(results, batched_inputs, images.image_sizes)):
            height = input_per_image.get("height", image_size[0])
            width = input_per_image.get("width", image_size[1])
            instances = detector_postprocess(result, height, width)
            if self.panoptic_on:  # the instances of things, as detectron2's panoptic models give them
                instances = instances[self.thing_classes[instances.pred_classes]]
            queries = instances.get("query_index")
            instances.remove("query_index")
            processed.append({"instances": instances})
            if not self.mask_on:
                continue
            # the masks of the kept detections' queries and of the panoptic segments' queries,
            # each query's once; the instances' set after detectron2's post-processing, which
            # takes masks for box-relative ones
            if self.panoptic_on:
                panoptic, scores, labels = panoptic_queries(outputs["pred_logits"][i], self.class_loss, self.panoptic_threshold)
                queries = torch.cat([queries, panoptic])
            unique, inverse = torch.unique(queries, return_inverse=True)
            with precision:
                logits = outputs["mask_predictor"](torch.full_like(unique, i), unique)[inverse]
            instances.pred_masks = full_image_masks(
                logits[: len(instances)], images.tensor.shape[-2:], image_size, (height, width)
            )
            if self.panoptic_on:
                processed[-1]["panoptic_seg"] = panoptic_segmentation(
                    scores, labels, logits[len(instances):], image_size, (height, width), self.thing_classes,
                    self.panoptic_min_area,
                )
        return processed

    def prepare_targets(self, batched_inputs, image_sizes):
        """detectron2 instances -> labels, normalized cxcywh boxes and, with MODEL.MASK_ON, [n, h, w] bool masks."""
        targets = []
        for x, (h, w) in zip(batched_inputs, image_sizes):
            instances = x["instances"].to(self.device)
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float, device=self.device)
            boxes = box_xyxy_to_cxcywh(instances.gt_boxes.tensor / scale)
            target = {"labels": instances.gt_classes, "boxes": boxes}
            if self.mask_on:
                target["masks"] = instance_masks(instances, h, w)
            targets.append(target)
        return targets

    def build_mask_head(self, hidden_dim, num_heads, transformer_feature):
        """
        DETR's mask head on this detector, built last: an attention map over its stride-32
        memory (or stride-16: res4's, or a dilated res5's) and the convolutional head on the
        backbone's MASK_FEATURES, under the official names. With MODEL.DETR.TRAIN_MASK_HEAD_ONLY everything built before it is
        frozen.
        """
        if transformer_feature not in ("res4", "res5"):
            raise ValueError(
                f"MODEL.MASK_ON: the mask head adds res4, res3 and res2 to a memory of stride 16 or 32, but the "
                f"transformer reads {transformer_feature}; set MODEL.RESNETS.OUT_FEATURES ['res5'] or ['res4']"
            )
        if (hidden_dim + num_heads) % 8 or hidden_dim % 128:
            raise ValueError(
                f"MODEL.MASK_ON: the mask head's GroupNorms of 8 groups need MODEL.DETR.HIDDEN_DIM a multiple of 128 "
                f"and HIDDEN_DIM + NHEADS a multiple of 8, got {hidden_dim} and {num_heads}"
            )
        if self.train_mask_head_only:
            for parameter in self.parameters():
                parameter.requires_grad_(False)
        shapes = self.backbone.output_shape()
        self.bbox_attention = AttentionMap(hidden_dim, hidden_dim, num_heads)
        self.mask_head = MaskHeadSmallConv(
            hidden_dim + num_heads, [shapes[name].channels for name in MASK_FEATURES], hidden_dim
        )

    def mask_predictor(self, embeddings, memory, memory_padding_mask, projected, features):
        """
        The mask logits of any queries: a function of (batch_index, query_index), [N] each,
        giving [N, H/4, W/4]. The attention maps of every query, `embeddings` [batch,
        num_queries, d] of the last decoder layer over the `memory` [batch, d, h, w] (stride
        32 or 16) (`memory_padding_mask` [batch, h, w]), cost little and are computed at once; the
        convolutional head, on the `projected` features there and the backbone's `features`
        by name, runs for the queries asked only (training: the matched ones), under the
        autocast state of this call.
        """
        attention = self.bbox_attention(embeddings, memory, memory_padding_mask)
        fpn_features = [features[name] for name in MASK_FEATURES]
        device_type = memory.device.type
        autocast = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)

        def predict(batch_index, query_index):
            with torch.autocast(device_type, dtype=autocast[1], enabled=autocast[0]):
                return self.mask_head(projected, attention[batch_index, query_index], fpn_features, batch_index)

        return predict

    @staticmethod
    def all_masks(predict, batch, num_queries, device):
        """The official "pred_masks": every query's mask logits, [batch, num_queries, H/4, W/4]."""
        batch_index = torch.arange(batch, device=device).repeat_interleave(num_queries)
        query_index = torch.arange(num_queries, device=device).repeat(batch)
        masks = predict(batch_index, query_index)
        return masks.view(batch, num_queries, *masks.shape[-2:])

    def add_masks(self, outputs, predict, lazy):
        """Add to `outputs` every query's "pred_masks", or with `lazy` the "mask_predictor" for the queries needed."""
        if lazy:
            outputs["mask_predictor"] = predict
        else:
            batch, num_queries = outputs["pred_logits"].shape[:2]
            outputs["pred_masks"] = self.all_masks(predict, batch, num_queries, outputs["pred_logits"].device)
        return outputs

    def inference(self, pred_logits, pred_boxes, image_sizes):
        """`postprocess.detections` as detectron2 Instances, one per image, with the query of each detection."""
        scores, labels, boxes, queries = detections(pred_logits, pred_boxes, image_sizes, self.class_loss, self.num_topk)
        results = []
        for i, (h, w) in enumerate(image_sizes):
            result = Instances((h, w))
            result.pred_boxes = Boxes(boxes[i])
            result.scores = scores[i]
            result.pred_classes = labels[i]
            result.query_index = queries[i]
            results.append(result)
        return results


class SingleLevelDetector(SetPredictionDetector):
    """
    DETR and Conditional DETR: one feature map of a ResNet with a padding mask and sine
    positions, DETR's encoder, a decoder given by the subclass, and one class and one
    box head shared by every decoder layer.
    """

    def __init__(self, cfg, build_decoder):
        super().__init__(cfg)
        args = cfg.MODEL.DETR
        hidden_dim = args.HIDDEN_DIM
        self.backbone, (self.feature_name,) = build_resnet_like_torchvision(
            cfg, extra_features=MASK_FEATURES if self.mask_on else ()
        )
        feature_channels = self.backbone.output_shape()[self.feature_name].channels
        self.input_proj = nn.Conv2d(feature_channels, hidden_dim, kernel_size=1)
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2)
        encoder = TransformerEncoder(hidden_dim, args.NHEADS, args.ENC_LAYERS, args.DIM_FEEDFORWARD, args.DROPOUT)
        self.transformer = Transformer(encoder, build_decoder(args))
        self.query_embed = nn.Embedding(self.num_queries, hidden_dim)
        # apart from the first group, so that checkpoints load with any number of groups
        self.group_query_embed = (
            nn.Embedding((self.query_groups - 1) * self.num_queries, hidden_dim) if self.query_groups > 1 else None
        )
        self.class_embed = nn.Linear(hidden_dim, self.num_class_logits)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.init_class_head(self.class_embed)
        if self.mask_on:
            self.build_mask_head(hidden_dim, args.NHEADS, self.feature_name)
        self.use_memory_format(self.backbone, self.input_proj)
        ops.set_implementation(self, args.OPS_IMPL)

    def predict_boxes(self, hs, reference):
        """Normalized cxcywh boxes of every layer from its embeddings `hs`."""
        raise NotImplementedError

    def object_queries(self):
        """The object queries and their number of groups: the extra groups train only."""
        if self.training and self.group_query_embed is not None:
            return torch.cat([self.query_embed.weight, self.group_query_embed.weight]), self.query_groups
        return self.query_embed.weight, 1

    def forward_outputs(self, images: ImageList, lazy_masks=False):
        all_features = features_with_padding_masks(self.run_backbone, images)
        features, mask = all_features[self.feature_name]
        pos = self.position_embedding(mask).to(features.dtype)
        queries, num_groups = self.object_queries()
        projected = self.input_proj(features)
        out = self.transformer(projected, mask, queries, pos, num_groups)
        hs, reference = out["hs"], out["reference"]
        if self.mask_on:
            memory = out["memory"].transpose(1, 2).reshape(projected.shape)
            backbone_features = {name: feature for name, (feature, _) in all_features.items()}
            predict_masks = self.mask_predictor(hs[-1], memory, mask, projected, backbone_features)

        with heads_in_float32(hs):
            hs, reference = as_float32((hs, reference))
            outputs_class = self.class_embed(hs)  # [num_layers, batch, num_queries, num_class_logits]
            outputs_coord = self.predict_boxes(hs, reference)
        outputs = {
            "pred_logits": outputs_class[-1],
            "pred_boxes": outputs_coord[-1],
            "aux_outputs": [
                {"pred_logits": c, "pred_boxes": b}
                for c, b in zip(outputs_class[:-1], outputs_coord[:-1])
            ],
        }
        if self.mask_on:
            self.add_masks(outputs, predict_masks, lazy_masks)
        return outputs
