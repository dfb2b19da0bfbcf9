"""
Deformable DETR (Zhu et al., ICLR 2021), the multi-scale baseline of Conditional DETR:
a ResNet's res3-res5 plus extra strided levels, the deformable transformer, and class
and box heads on every decoder layer; optionally with iterative box refinement and
two-stage proposals. It shares the set losses, inference and detectron2 interface of
the package's other detectors.
"""
import copy

import torch
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from torch import nn

from .. import ops
from .backbone import build_resnet_like_torchvision, feature_padding_mask
from .mask_head import MASK_FEATURES
from .box_ops import inverse_sigmoid
from .deformable_transformer import DeformableTransformer
from .detector import SetPredictionDetector, as_float32, heads_in_float32
from .position_encoding import PositionEmbeddingSine
from .norms import GroupNorm
from .transformer import MLP

# the parameters (by name) trained at MODEL.DEFORMABLE_DETR.LINEAR_PROJ_LR_MULTIPLIER
LINEAR_PROJECTION_NAMES = ("sampling_offsets", "reference_points")
GROUP_NORM_GROUPS = 32


def input_projection(in_channels, hidden_dim, kernel_size=1, stride=1):
    conv = nn.Conv2d(in_channels, hidden_dim, kernel_size, stride=stride, padding=kernel_size // 2)
    nn.init.xavier_uniform_(conv.weight, gain=1)
    nn.init.constant_(conv.bias, 0)
    return nn.Sequential(conv, GroupNorm(GROUP_NORM_GROUPS, hidden_dim))


@META_ARCH_REGISTRY.register()
class DeformableDETR(SetPredictionDetector):
    """
    Plain: one class head and one box head shared by every decoder layer, learned queries
    whose reference points are a linear function of their position half, boxes predicted
    around the references. MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE gives every layer heads
    of its own, the box head also moving the next layer's references; TWO_STAGE adds one
    more pair of heads scoring the encoder's proposals, the best of which replace the
    learned queries. The official parameter names, shared modules listed under every name.
    """

    own_config_node = "DEFORMABLE_DETR"

    def __init__(self, cfg):
        super().__init__(cfg)
        args = cfg.MODEL.DETR
        deformable = cfg.MODEL.DEFORMABLE_DETR
        if self.class_loss != "focal":
            raise ValueError(
                f"DeformableDETR is trained with the focal loss: MODEL.DETR.CLASS_LOSS "
                f"must be 'focal', got {self.class_loss!r}"
            )
        if self.query_groups != 1:
            raise ValueError(
                "groups of queries are built for DETR and Conditional DETR: DeformableDETR needs "
                f"MODEL.DETR.QUERY_GROUPS 1, got {self.query_groups}"
            )
        self.two_stage = deformable.TWO_STAGE
        self.with_box_refine = deformable.WITH_BOX_REFINE
        if self.two_stage and not self.with_box_refine:
            raise ValueError(
                "MODEL.DEFORMABLE_DETR.TWO_STAGE needs MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE: the "
                "proposal heads are the refinement heads' last pair"
            )
        hidden_dim = args.HIDDEN_DIM
        if hidden_dim % GROUP_NORM_GROUPS:
            raise ValueError(
                f"DeformableDETR normalizes its input projections in {GROUP_NORM_GROUPS} groups: "
                f"MODEL.DETR.HIDDEN_DIM must be a multiple of {GROUP_NORM_GROUPS}, got {hidden_dim}"
            )
        for key in ("NUM_FEATURE_LEVELS", "ENC_N_POINTS", "DEC_N_POINTS"):
            if deformable[key] < 1:
                raise ValueError(f"MODEL.DEFORMABLE_DETR.{key} must be positive, got {deformable[key]}")
        num_levels = deformable.NUM_FEATURE_LEVELS
        num_backbone_levels = len(cfg.MODEL.RESNETS.OUT_FEATURES)
        if num_levels < num_backbone_levels:
            raise ValueError(
                f"MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS is {num_levels} but MODEL.RESNETS.OUT_FEATURES "
                f"names {num_backbone_levels} stages: it needs at least one level per stage"
            )
        self.backbone, self.feature_names = build_resnet_like_torchvision(
            cfg, num_features=num_backbone_levels, extra_features=MASK_FEATURES if self.mask_on else ()
        )
        channels = [self.backbone.output_shape()[name].channels for name in self.feature_names]
        projections = [input_projection(c, hidden_dim) for c in channels]
        in_channels = channels[-1]
        for _ in range(num_levels - num_backbone_levels):
            projections.append(input_projection(in_channels, hidden_dim, kernel_size=3, stride=2))
            in_channels = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        self.use_memory_format(self.backbone, self.input_proj)
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, offset=0.5)

        self.transformer = DeformableTransformer(
            hidden_dim, args.NHEADS, args.ENC_LAYERS, args.DEC_LAYERS, args.DIM_FEEDFORWARD, args.DROPOUT,
            num_levels, deformable.ENC_N_POINTS, deformable.DEC_N_POINTS, self.two_stage,
            self.num_queries,
        )
        if not self.two_stage:
            self.query_embed = nn.Embedding(self.num_queries, hidden_dim * 2)
        self.build_heads(hidden_dim, args.DEC_LAYERS)
        self.criterion.weight_dict.update(
            {f"{k}_enc": v for k, v in list(self.criterion.weight_dict.items())[:3]}
        )
        self.lr_multipliers = {name: deformable.LINEAR_PROJ_LR_MULTIPLIER for name in LINEAR_PROJECTION_NAMES}
        if self.mask_on:
            # on the stride-32 level, whose memory and projected features are DETR's
            self.build_mask_head(hidden_dim, args.NHEADS, self.feature_names[-1])
        ops.set_implementation(self, args.OPS_IMPL)

    def build_heads(self, hidden_dim, num_decoder_layers):
        class_embed = nn.Linear(hidden_dim, self.num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.init_class_head(class_embed)
        # boxes start at the reference points, small (sigmoid(-2) of the image)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        num_heads = num_decoder_layers + (1 if self.two_stage else 0)
        if self.with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_heads))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_heads))
            # only the first layer's references are points, whose size the head gives
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed] * num_heads)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_heads)
        if self.two_stage:
            # the proposals already carry a size: every head starts from it
            self.transformer.decoder.class_embed = self.class_embed
            for head in self.bbox_embed:
                nn.init.constant_(head.layers[-1].bias[2:], 0.0)

    def multi_scale_features(self, images: ImageList):
        """The projected levels, their padding masks and positions, finest first, and the backbone's features by name."""
        features = self.run_backbone(images.tensor)
        padded_size = images.tensor.shape[-2:]
        srcs = [proj(features[name]) for proj, name in zip(self.input_proj, self.feature_names)]
        for proj in self.input_proj[len(srcs):]:
            # the first extra level reads the raw last stage, later ones the previous level
            srcs.append(proj(features[self.feature_names[-1]] if len(srcs) == len(self.feature_names) else srcs[-1]))
        masks = [feature_padding_mask(images.image_sizes, padded_size, src.shape[-2:], src.device) for src in srcs]
        positions = [self.position_embedding(mask).to(src.dtype) for mask, src in zip(masks, srcs)]
        return srcs, masks, positions, features

    def forward_outputs(self, images: ImageList, lazy_masks=False):
        """
        The official output dict ("pred_logits", "pred_boxes", "aux_outputs"); two-stage
        adds "enc_outputs", the logits and boxes of every encoder proposal; MODEL.MASK_ON
        the masks, as `SetPredictionDetector.forward_outputs` says.
        """
        srcs, masks, positions, features = self.multi_scale_features(images)
        query_embed = None if self.two_stage else self.query_embed.weight
        out = self.transformer(srcs, masks, positions, query_embed)
        if self.mask_on:
            level = len(self.feature_names) - 1  # the stride-32 level: res5's
            start = sum(src.shape[-2] * src.shape[-1] for src in srcs[:level])
            memory = out["memory"][:, start : start + srcs[level].shape[-2] * srcs[level].shape[-1]]
            memory = memory.transpose(1, 2).reshape(srcs[level].shape)
            predict_masks = self.mask_predictor(out["hs"][-1], memory, masks[level], srcs[level], features)

        hs = out["hs"]  # [num_layers, batch, num_queries, hidden_dim]
        references = [out["init_reference"]] + list(out["inter_references"][:-1])
        outputs_class, outputs_coord = [], []
        with heads_in_float32(hs):
            hs, references = as_float32((hs, references))
            for layer, reference in enumerate(references):
                reference = inverse_sigmoid(reference)
                delta = self.bbox_embed[layer](hs[layer])
                if reference.shape[-1] == 4:
                    boxes = delta + reference
                else:
                    boxes = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
                outputs_class.append(self.class_embed[layer](hs[layer]))
                outputs_coord.append(boxes.sigmoid())
        outputs = {
            "pred_logits": outputs_class[-1],
            "pred_boxes": outputs_coord[-1],
            "aux_outputs": [
                {"pred_logits": c, "pred_boxes": b} for c, b in zip(outputs_class[:-1], outputs_coord[:-1])
            ],
        }
        if self.two_stage:
            outputs["enc_outputs"] = {
                "pred_logits": out["enc_outputs_class"],
                "pred_boxes": out["enc_outputs_coord_unact"].sigmoid(),
            }
        if self.mask_on:
            self.add_masks(outputs, predict_masks, lazy_masks)
        return outputs
