"""From the heads' raw outputs to detections: what eager inference and the exported models share."""
import torch
import torch.nn.functional as F

from .box_ops import box_cxcywh_to_xyxy, image_sizes_tensor

__all__ = ["detections", "full_image_masks", "panoptic_queries", "panoptic_segmentation"]


def detections(pred_logits, pred_boxes, image_sizes, class_loss, num_topk):
    """
    Focal loss: the official top-k (query, class) pairs of sigmoid scores per image, so one
    query can give several detections. Softmax: DETR's best class of each query, "no object"
    left out.

    Args:
        pred_logits: [batch, num_queries, num_class_logits]; pred_boxes: [batch, num_queries, 4]
            normalized cxcywh.
        image_sizes: [batch, 2] tensor of (height, width), or a list of pairs.
    Returns:
        scores [batch, K], labels [batch, K] (contiguous class indices), boxes [batch, K, 4]
        (XYXY in the pixels of each image, not clipped) and the query of each, [batch, K];
        K is `num_topk` (focal) or the queries.
    """
    boxes = box_cxcywh_to_xyxy(pred_boxes)
    if class_loss == "softmax":
        scores, labels = pred_logits.softmax(-1)[..., :-1].max(-1)
        query_index = torch.arange(pred_logits.shape[1], device=pred_logits.device).expand_as(labels)
    else:
        batch, num_queries, num_classes = pred_logits.shape
        k = min(num_topk, num_queries * num_classes)
        scores, flat_index = pred_logits.sigmoid().view(batch, -1).topk(k, dim=1)
        labels = flat_index % num_classes
        query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
        boxes = torch.gather(boxes, 1, query_index.unsqueeze(-1).expand(-1, -1, 4))
    sizes = image_sizes_tensor(image_sizes, boxes.device).to(boxes.dtype)
    scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=-1)[:, None]
    return scores, labels, boxes * scale, query_index


def full_image_masks(mask_logits, padded_size, image_size, output_size, threshold=0.5, chunk=16):
    """
    Stride-4 mask logits of the padded batch, [K, H/4, W/4], as [K, output_h, output_w] bool
    masks of one image, as the official PostProcessSegm: upsampled bilinearly to the padded
    size, thresholded, cropped to the image, resized (nearest) to the output size. `chunk`
    masks at a time, so that the full-size floats of a hundred never coexist.
    """
    height, width = image_size
    masks = []
    for logits in mask_logits.split(chunk):
        full = F.interpolate(logits[:, None].float(), size=tuple(padded_size), mode="bilinear", align_corners=False)
        kept = (full[:, :, :height, :width].sigmoid() > threshold).float()
        masks.append(F.interpolate(kept, size=tuple(output_size), mode="nearest")[:, 0] > 0.5)
    if not masks:
        return mask_logits.new_zeros((0, *output_size), dtype=torch.bool)
    return torch.cat(masks)


def panoptic_queries(class_logits, class_loss, threshold=0.85):
    """
    The queries of one image that the panoptic segmentation keeps, as the official
    PostProcessPanoptic: those whose best class is not "no object" (softmax) and whose
    score is above `threshold`; a focal-loss head has no "no object", so there its best
    class's sigmoid score alone decides. Returns their indices, scores and classes.
    """
    if class_loss == "softmax":
        scores, labels = class_logits.softmax(-1).max(-1)
        keep = (labels != class_logits.shape[-1] - 1) & (scores > threshold)
    else:
        scores, labels = class_logits.sigmoid().max(-1)
        keep = scores > threshold
    return keep.nonzero()[:, 0], scores[keep], labels[keep]


def panoptic_segmentation(scores, labels, mask_logits, image_size, output_size, thing_classes, min_area=4):
    """
    One image's panoptic segmentation from its kept queries (`panoptic_queries`), with the
    official PostProcessPanoptic semantics, vectorized over queries and pixels: their
    stride-4 mask logits of the padded batch resized bilinearly to `image_size` (as the
    official code, which evaluates one image per batch), each pixel to the query of highest
    logit; the queries of one stuff class merged into the first of them; segments of
    `min_area` pixels or fewer (at the output size) dropped and the pixels assigned again
    among the others (without merging, as the official code), until none is that small.

    Args:
        scores, labels: [K] of the kept queries; mask_logits: [K, H/4, W/4].
        image_size: (h, w) the masks are resized to; output_size: (height, width) of the result.
        thing_classes: [num_classes] bool, whether each class is a thing.
    Returns:
        segment ids [height, width] int32 (0: no segment, else 1 + the segment's index) and the
        segments: a list of dicts with "id", "category_id" (the model's class), "isthing",
        "score" and "area" (pixels).
    """
    nothing = torch.zeros(tuple(output_size), dtype=torch.int32, device=mask_logits.device), []
    if not len(labels):
        return nothing
    masks = F.interpolate(mask_logits[None].float(), size=tuple(image_size), mode="bilinear", align_corners=False)[0]

    def assign(masks, merge_stuff):
        index = masks.argmax(0)
        if merge_stuff:
            # every query of a stuff class to the first of them
            stuff = ~thing_classes[labels]
            same = (labels[:, None] == labels[None, :]) & stuff[:, None] & stuff[None, :]
            first = torch.where(same.any(1), same.int().argmax(1), torch.arange(len(labels), device=labels.device))
            index = first[index]
        if tuple(output_size) != tuple(image_size):
            index = F.interpolate(index[None, None].float(), size=tuple(output_size), mode="nearest")[0, 0].long()
        return index, torch.bincount(index.flatten(), minlength=len(masks))

    index, areas = assign(masks, merge_stuff=True)
    while (areas <= min_area).any():
        large = areas > min_area
        scores, labels, masks = scores[large], labels[large], masks[large]
        if not len(labels):
            return nothing
        index, areas = assign(masks, merge_stuff=False)
    segments = [
        {"id": i + 1, "category_id": int(label), "isthing": bool(thing_classes[label]), "score": float(score), "area": int(area)}
        for i, (label, score, area) in enumerate(zip(labels, scores, areas))
    ]
    return (index + 1).to(torch.int32), segments
