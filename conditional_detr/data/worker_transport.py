"""
How mapped samples travel from a DataLoader worker to the training process.

torch hands every tensor of a worker's sample over in its own shared-memory segment, and
receiving one costs about the same whatever its size: for the embedded demo's small images,
boxes and classes that fixed cost dominates the main process's share of a step, while
copying a whole small sample through the pipe costs a fraction of it. A COCO-sized image is
the other way round. So small tensors go by value and large ones keep the shared-memory
route (measurements in docs/speed.md).
"""
import copyreg
import io
import pickle

import torch

__all__ = ["SmallTensorsByValue"]

# Where copying a tensor by value starts to cost more than a shared-memory segment.
BY_VALUE_BYTES = 256 * 1024
_NUMPY_DTYPES = {
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.float32, torch.float64,
}


def _goes_by_value(tensor):
    return (
        type(tensor) is torch.Tensor
        and tensor.device.type == "cpu"
        and not tensor.requires_grad
        and tensor.dtype in _NUMPY_DTYPES
        and tensor.numel() * tensor.element_size() <= BY_VALUE_BYTES
    )


def _tensor_from_numpy(tensor):
    return torch.from_numpy, (tensor.numpy(),)


_DISPATCH = copyreg.dispatch_table.copy()
_DISPATCH[torch.Tensor] = _tensor_from_numpy


class _Pickler(pickle.Pickler):
    """Small tensors as numpy arrays; the others set aside, to be pickled by torch's reducers."""

    dispatch_table = _DISPATCH

    def __init__(self, file):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.set_aside = []

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor) and not _goes_by_value(obj):
            self.set_aside.append(obj)
            return len(self.set_aside) - 1
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, data, set_aside):
        super().__init__(io.BytesIO(data))
        self.set_aside = set_aside

    def persistent_load(self, index):
        return self.set_aside[index]


def _unpack(data, set_aside):
    return _Unpickler(data, set_aside).load()


class _Packed:
    """A sample that unpickles as itself: the receiving process never sees this wrapper."""

    def __init__(self, sample):
        self.sample = sample

    def __reduce__(self):
        buffer = io.BytesIO()
        pickler = _Pickler(buffer)
        pickler.dump(self.sample)
        return _unpack, (buffer.getvalue(), pickler.set_aside)


class SmallTensorsByValue:
    """
    A mapper whose samples, when a DataLoader worker sends them, carry their small tensors
    by value. Only for loaders with workers: in the same process it would hand over the
    wrapper itself.
    """

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, dataset_dict):
        sample = self.mapper(dataset_dict)
        # None asks detectron2's MapDataset for another sample: it must stay visible
        return None if sample is None else _Packed(sample)
