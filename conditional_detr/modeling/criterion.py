import torch
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .matcher import check_class_loss

# the mask losses' focal loss, whatever the class loss's: DETR's
MASK_FOCAL_ALPHA, MASK_FOCAL_GAMMA = 0.25, 2.0


class SetCriterion(nn.Module):
    """
    The set losses: match predictions to targets, then a classification loss and
    L1 + GIoU losses on matched boxes, normalized by the number of target boxes
    averaged over workers. The classification loss is Conditional DETR's sigmoid focal
    loss over all queries and classes (normalized the same way), or with
    `class_loss="softmax"` DETR's cross-entropy over num_classes + 1 logits, the last
    one "no object", weighted `eos_coef` for unmatched queries. With auxiliary
    outputs, every decoder layer is matched and supervised the same way; with encoder
    outputs (two-stage Deformable DETR), the encoder's proposals are matched and
    supervised as one class-agnostic foreground class. With `num_groups` groups of queries,
    each group is matched on its own and the losses are averaged over the groups.

    With "masks" among `losses`, the matched queries' mask logits (of "pred_masks", or from
    the "mask_predictor" run for them alone; stride 4) are upsampled bilinearly to the padded size of the targets' masks and trained with a
    sigmoid focal loss (alpha 0.25, gamma 2, the mean over pixels) and the DICE loss, as
    DETR's mask head.

    `losses` names the terms to compute, as the official `get_loss` map: each is a method
    `loss_<name>(outputs, targets, indices, num_boxes)` of the matched outputs and targets,
    returning a dict of terms; those of LAST_LAYER_ONLY are left out of the auxiliary
    layers and the encoder's proposals.
    """

    # the masks of every layer would cost the mask head's memory once per layer (the official choice)
    LAST_LAYER_ONLY = ("masks",)

    def __init__(
        self, num_classes, matcher, weight_dict, focal_alpha=0.25, focal_gamma=2.0,
        class_loss="focal", eos_coef=0.1, num_groups=1, losses=("labels", "boxes"),
    ):
        super().__init__()
        for name in losses:
            if not callable(getattr(self, f"loss_{name}", None)):
                raise ValueError(f"unknown set loss {name!r}: {type(self).__name__} has no loss_{name}")
        self.losses = tuple(losses)
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.class_loss = check_class_loss(class_loss)
        self.num_groups = num_groups
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef
        # not persistent: official checkpoints hold no criterion state
        self.register_buffer("softmax_class_weight", class_weight, persistent=False)

    def loss_labels(self, outputs, targets, indices, num_boxes):
        logits = outputs["pred_logits"]
        batch_idx, src_idx = _prediction_index(indices, logits.device)
        matched_classes = torch.cat([t["labels"][j.to(logits.device)] for t, (_, j) in zip(targets, indices)])
        if self.class_loss == "softmax":
            target_classes = torch.full(logits.shape[:2], self.num_classes, device=logits.device)
            target_classes[batch_idx, src_idx] = matched_classes
            # [batch, num_classes + 1, num_queries] against [batch, num_queries]
            loss = F.cross_entropy(logits.transpose(1, 2), target_classes, self.softmax_class_weight)
            return {"loss_ce": loss}
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, src_idx, matched_classes] = 1
        loss = sigmoid_focal_loss(
            logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )
        return {"loss_ce": loss / num_boxes}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        batch_idx, src_idx = _prediction_index(indices, outputs["pred_boxes"].device)
        src_boxes = outputs["pred_boxes"][batch_idx, src_idx]
        target_boxes = torch.cat([t["boxes"][j.to(src_boxes.device)] for t, (_, j) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        giou = torch.diag(
            generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))
        )
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}

    def loss_masks(self, outputs, targets, indices, num_boxes):
        device = outputs["pred_logits"].device
        batch_idx, src_idx = _prediction_index(indices, device)
        if "pred_masks" in outputs:
            pred_masks = outputs["pred_masks"][batch_idx, src_idx]
        else:  # the mask head run for the matched queries only: the same losses, a fraction of its memory
            pred_masks = outputs["mask_predictor"](batch_idx, src_idx).float()
        # every image's targets padded to the largest, as the official nested tensor does
        height = max(t["masks"].shape[-2] for t in targets)
        width = max(t["masks"].shape[-1] for t in targets)
        target_masks = torch.cat([
            F.pad(t["masks"][j.to(t["masks"].device)], (0, width - t["masks"].shape[-1], 0, height - t["masks"].shape[-2]))
            for t, (_, j) in zip(targets, indices)
        ]).to(device, pred_masks.dtype).flatten(1)
        src_masks = F.interpolate(
            pred_masks[:, None], size=(height, width), mode="bilinear", align_corners=False
        )[:, 0].flatten(1)
        focal = sigmoid_focal_loss(src_masks, target_masks, alpha=MASK_FOCAL_ALPHA, gamma=MASK_FOCAL_GAMMA, reduction="none")
        probabilities = src_masks.sigmoid()
        dice = 1 - (2 * (probabilities * target_masks).sum(1) + 1) / (probabilities.sum(1) + target_masks.sum(1) + 1)
        # no match: zero losses that still reach the head (its empty run), as every parameter must under DDP
        unmatched = pred_masks.sum() * 0
        return {"loss_mask": focal.mean(1).sum() / num_boxes + unmatched, "loss_dice": dice.sum() / num_boxes + unmatched}

    def _losses_of_layer(self, outputs, targets, num_boxes, suffix="", num_groups=1, last_layer=False):
        indices = self.matcher(outputs, targets, num_groups)
        losses = {}
        for name in self.losses:
            if last_layer or name not in self.LAST_LAYER_ONLY:
                losses.update(getattr(self, f"loss_{name}")(outputs, targets, indices, num_boxes))
        return {k + suffix: v for k, v in losses.items()}

    def forward(self, outputs, targets):
        """
        Returns the unweighted loss terms: "loss_ce", "loss_bbox", "loss_giou" for
        the last layer, the same with "_{i}" for auxiliary layer i and with "_enc" for
        the encoder's proposals.
        """
        num_boxes = sum(len(t["labels"]) for t in targets)
        num_boxes = torch.as_tensor([num_boxes], dtype=torch.float, device=outputs["pred_logits"].device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(num_boxes)
        num_boxes = torch.clamp(num_boxes / comm.get_world_size(), min=1).item()

        # every group holds a match of every target
        grouped = num_boxes * self.num_groups
        losses = self._losses_of_layer(outputs, targets, grouped, num_groups=self.num_groups, last_layer=True)
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._losses_of_layer(aux_outputs, targets, grouped, f"_{i}", self.num_groups))
        if "enc_outputs" in outputs:
            foreground = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self._losses_of_layer(outputs["enc_outputs"], foreground, num_boxes, "_enc"))
        return losses


def _prediction_index(indices, device):
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx.to(device), src_idx.to(device)
