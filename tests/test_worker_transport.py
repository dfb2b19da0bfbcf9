"""
Samples from DataLoader workers: small tensors by value, large ones in shared memory, same
contents.
"""
import torch
from detectron2.structures import Boxes, Instances
from torch.utils.data import DataLoader

from conditional_detr.data import worker_transport
from conditional_detr.data.worker_transport import SmallTensorsByValue


def make_sample(index):
    generator = torch.Generator().manual_seed(index)
    instances = Instances((12, 16))
    instances.gt_boxes = Boxes(torch.rand(3, 4, generator=generator))
    instances.gt_classes = torch.tensor([index, 1, 2])
    return {
        "image": torch.randint(0, 256, (3, 12, 16), dtype=torch.uint8, generator=generator),
        # above the by-value limit
        "large": torch.rand(worker_transport.BY_VALUE_BYTES // 4 + 1, generator=generator),
        "transposed": torch.arange(12.0).view(3, 4).t(),
        "bfloat16": torch.ones(2, dtype=torch.bfloat16),
        "instances": instances,
        "file_name": f"{index}.png",
    }


def received(mapper, indices):
    # batch_size=None: the worker applies collate_fn, here the mapper, to each index; a stuck
    # worker (shared memory full) fails the test instead of hanging the run
    loader = DataLoader(list(indices), num_workers=1, batch_size=None, collate_fn=mapper, timeout=120)
    return list(loader)


def test_worker_samples_equal_the_mappers_and_share_only_large_tensors():
    samples = received(SmallTensorsByValue(make_sample), range(3))
    for index, sample in enumerate(samples):
        expected = make_sample(index)
        assert isinstance(sample, dict) and sample["file_name"] == expected["file_name"]
        for key in ("image", "large", "transposed", "bfloat16"):
            torch.testing.assert_close(sample[key], expected[key], rtol=0, atol=0)
        torch.testing.assert_close(sample["instances"].gt_boxes.tensor, expected["instances"].gt_boxes.tensor)
        assert torch.equal(sample["instances"].gt_classes, expected["instances"].gt_classes)
        assert sample["instances"].image_size == (12, 16)
        # the large tensor, and the dtype numpy lacks, through shared memory; the rest copied
        assert sample["large"].is_shared() and sample["bfloat16"].is_shared()
        assert not sample["image"].is_shared() and not sample["instances"].gt_boxes.tensor.is_shared()


def test_a_mapper_declining_a_sample_still_returns_none():
    assert SmallTensorsByValue(lambda d: None)({"file_name": "x"}) is None
