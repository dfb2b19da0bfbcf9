import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def focal_class_cost(logits, target_classes, alpha, gamma):
    """
    The focal loss of labelling each prediction with each target class, minus that of
    labelling it background: [num_predictions, num_targets].
    """
    prob = logits.sigmoid()
    neg_cost = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
    pos_cost = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    return pos_cost[:, target_classes] - neg_cost[:, target_classes]


def softmax_class_cost(logits, target_classes):
    """DETR's class cost: minus the softmax probability of the target class."""
    return -logits.softmax(-1)[:, target_classes]


CLASS_LOSSES = ("focal", "softmax")


def check_class_loss(class_loss):
    if class_loss not in CLASS_LOSSES:
        raise ValueError(f"class loss must be one of {CLASS_LOSSES}, got {class_loss!r}")
    return class_loss


class HungarianMatcher(nn.Module):
    """
    One-to-one assignment of predictions to targets minimizing a weighted sum of the
    class cost (focal, or DETR's softmax one with `class_loss="softmax"`), the L1
    distance of boxes and their negative GIoU. Predictions left unmatched are background.
    """

    def __init__(
        self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0,
        class_loss="focal",
    ):
        super().__init__()
        self.class_loss = check_class_loss(class_loss)
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one matching cost must be non-zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def forward(self, outputs, targets, num_groups=1):
        """
        Args:
            outputs: "pred_logits" [batch, num_queries, num_classes (+ 1 no-object for softmax)] and
                "pred_boxes" [batch, num_queries, 4] normalized cxcywh.
            targets: per image, "labels" [num_targets] and "boxes" [num_targets, 4].
            num_groups: the queries are this many consecutive groups, each matched to all
                targets on its own.
        Returns:
            per image, (prediction indices, target indices), both int64 of equal length
            (num_groups times the targets).
        """
        batch, num_queries = outputs["pred_logits"].shape[:2]
        logits = outputs["pred_logits"].flatten(0, 1)  # [batch * num_queries, num_classes]
        pred_boxes = outputs["pred_boxes"].flatten(0, 1)
        target_classes = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets])

        if self.class_loss == "focal":
            class_cost = focal_class_cost(logits, target_classes, self.focal_alpha, self.focal_gamma)
        else:
            class_cost = softmax_class_cost(logits, target_classes)
        cost = (
            self.cost_class * class_cost
            + self.cost_bbox * torch.cdist(pred_boxes, target_boxes, p=1)
            - self.cost_giou
            * generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes))
        )
        cost = cost.view(batch, num_queries, -1).cpu()

        sizes = [len(t["boxes"]) for t in targets]
        group_size = num_queries // num_groups
        indices = []
        for image, image_cost in enumerate(cost.split(sizes, -1)):
            pairs = [linear_sum_assignment(c) for c in image_cost[image].split(group_size)]
            rows = np.concatenate([i + group * group_size for group, (i, _) in enumerate(pairs)])
            columns = np.concatenate([j for _, j in pairs])
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(columns, dtype=torch.int64)))
        return indices
