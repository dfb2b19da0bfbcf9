"""SOLVER.EMA: the average's arithmetic, its evaluation, its checkpoints and resuming."""
import json

import pytest
import torch
from detectron2.engine import HookBase

from conditional_detr.ema import FINAL_EMA_CHECKPOINT
from conditional_detr.engine import Trainer, get_config

from helpers.coco import write_coco_dataset
from helpers.paths import INSTANT_CONFIG

WATCHED = "class_embed.weight"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(module_folder):
    json_file, image_root = write_coco_dataset(str(module_folder("ema_data")), num_images=4)
    return ["DATASETS.COCO_INSTANCES", repr((("ema_data", json_file, image_root),)),
            "DATASETS.TRAIN", "('ema_data',)", "DATASETS.TEST", "('ema_data',)", "MODEL.DETR.NUM_CLASSES", "3"]


def ema_cfg(output_dir, dataset, *opts):
    return get_config(
        INSTANT_CONFIG,
        [*dataset, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(output_dir), "SOLVER.MAX_ITER", "3",
         "SOLVER.STEPS", "(2,)", "SOLVER.CHECKPOINT_PERIOD", "100", "SOLVER.BASE_LR", "0.01",
         "SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.DECAY", "0.5", *opts],
    )


class RecordWeights(HookBase):
    def __init__(self):
        self.seen = []

    def after_step(self):
        self.seen.append(self.trainer.model.state_dict()[WATCHED].clone())


@pytest.mark.slow
def test_average_is_evaluated_and_checkpointed(tmp_path, dataset):
    trainer = Trainer(ema_cfg(tmp_path, dataset))
    record = RecordWeights()
    trainer.register_hooks([record])
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = trainer._last_eval_results

    # first step: a copy; then average = 0.5 * average + 0.5 * weights
    expected = record.seen[0]
    for weights in record.seen[1:]:
        expected = 0.5 * expected + 0.5 * weights
    average = trainer.ema.module.state_dict()[WATCHED]
    torch.testing.assert_close(average, expected)
    assert not torch.allclose(average, record.seen[-1])

    assert set(results["bbox"]) >= {"AP", "AP-car"} and set(results["ema"]["bbox"]) >= {"AP", "AP-car"}
    with open(tmp_path / "metrics.json") as f:
        assert any("ema/bbox/AP" in json.loads(line) for line in f)
    assert (tmp_path / "inference_ema" / "coco_instances_results.json").exists()

    final = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert int(final["ema"]["n_averaged"]) == 3
    torch.testing.assert_close(final["ema"]["module." + WATCHED], expected)
    exported = torch.load(tmp_path / FINAL_EMA_CHECKPOINT, weights_only=True)
    torch.testing.assert_close(exported["model"][WATCHED], expected)
    assert exported["class_names"] == ["car", "dog", "person"]
    assert open(tmp_path / "last_checkpoint").read().strip() == "model_final.pth"

    # a resumed run goes on from the saved average
    resumed = Trainer(ema_cfg(tmp_path, dataset, "SOLVER.MAX_ITER", "4"))
    resumed.resume_or_load(resume=True)
    assert int(resumed.ema.n_averaged) == 3
    torch.testing.assert_close(resumed.ema.module.state_dict()[WATCHED], expected)


def test_off_by_default(tmp_path, dataset):
    cfg = get_config(INSTANT_CONFIG, [*dataset, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path)])
    assert cfg.SOLVER.EMA.ENABLED is False
    trainer = Trainer(cfg)
    assert trainer.ema is None and "ema" not in trainer.checkpointer.checkpointables


@pytest.mark.parametrize("decay", ["0.0", "1.0", "-0.5"])
def test_bad_decay_names_key_and_value(tmp_path, dataset, decay):
    with pytest.raises(ValueError, match=rf"SOLVER.EMA.DECAY must be in \(0, 1\), got {decay}"):
        Trainer(ema_cfg(tmp_path, dataset, "SOLVER.EMA.DECAY", decay))
