import torch
from torchvision.ops import box_convert, generalized_box_iou


def box_cxcywh_to_xyxy(boxes):
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes):
    return box_convert(boxes, "xyxy", "cxcywh")


def inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "generalized_box_iou", "inverse_sigmoid"]


def image_sizes_tensor(image_sizes, device=None):
    """
    (height, width) per image as a [batch, 2] tensor, from a tensor or from a list of pairs
    (ints, or 0-d tensors where detectron2's ImageList is traced).
    """
    if torch.is_tensor(image_sizes):
        return image_sizes
    if not any(torch.is_tensor(v) for size in image_sizes for v in size):
        return torch.tensor([tuple(size) for size in image_sizes], dtype=torch.long, device=device).view(-1, 2)
    return torch.stack([torch.stack([torch.as_tensor(h), torch.as_tensor(w)]) for h, w in image_sizes]).to(device)
