import torch


class NestedTensor:
    def __init__(self, tensors, mask):
        self.tensors, self.mask = tensors, mask


def nested_tensor_from_tensor_list(images):
    h = max(image.shape[1] for image in images)
    w = max(image.shape[2] for image in images)
    tensors = torch.zeros(len(images), 3, h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool)
    for i, image in enumerate(images):
        tensors[i, :, : image.shape[1], : image.shape[2]] = image
        mask[i, : image.shape[1], : image.shape[2]] = False
    return NestedTensor(tensors, mask)
