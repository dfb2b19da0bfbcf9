"""
The model zoo: every config by name, the official checkpoints downloaded, converted and
cached (and nothing cached from a broken download).
"""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from conditional_detr import ConditionalDETR, model_zoo
from conditional_detr.model_zoo import OFFICIAL_CHECKPOINTS, SCHEME, OfficialCheckpoint
from conditional_detr.model_zoo import model_zoo as model_zoo_module
from conditional_detr.checkpoint.catalog import CONVERTED_NUM_CLASSES
from conditional_detr.checkpoint import class_heads
from conditional_detr.checkpoint import official as official_formats

from helpers.official import official_keys, reference_file, tiny_fixture_cfg

TINY_NAME = "Tiny-R18"
TINY_CONFIG = "test/tiny_r18.yaml"


@pytest.mark.parametrize("config_path", model_zoo.list_configs())
def test_every_config_loads(config_path):
    cfg = model_zoo.get_config(config_path)
    assert cfg.MODEL.META_ARCHITECTURE
    with_checkpoint = {c.config for c in OFFICIAL_CHECKPOINTS.values()}
    if config_path in with_checkpoint:
        weights = model_zoo.get_config(config_path, trained=True).MODEL.WEIGHTS
        assert (
            weights.startswith(SCHEME)
            and OFFICIAL_CHECKPOINTS[weights[len(SCHEME) :]].config == config_path
        )
    else:
        with pytest.raises(
            RuntimeError,
            match=re.escape(f"no official checkpoint is published for config {config_path}"),
        ):
            model_zoo.get_config(config_path, trained=True)


def test_official_checkpoints_fit_their_configs():
    configs = set(model_zoo.list_configs())
    for name, checkpoint in OFFICIAL_CHECKPOINTS.items():
        assert (checkpoint.url or checkpoint.page or "").startswith("https://"), name
        if checkpoint.kind == "torchvision-resnet":
            assert checkpoint.config is None and checkpoint.sha256_prefix, name
            continue
        if checkpoint.config.startswith("COCO-Detection/conditional_detr_"):
            assert checkpoint.config in configs, name
        if checkpoint.config in configs:
            cfg = model_zoo.get_config(checkpoint.config)
            assert cfg.MODEL.DETR.NUM_CLASSES == checkpoint.num_classes, name


def test_unknown_config_and_name_list_the_known_ones():
    with pytest.raises(
        RuntimeError, match=r"nope\.yaml is not in the model zoo.*conditional_detr_R_50_50ep\.yaml"
    ):
        model_zoo.get_config_file("COCO-Detection/nope.yaml")
    with pytest.raises(
        ValueError,
        match=r"unknown official checkpoint conditional-detr://nope; known names: "
        r".*conditional-detr://ConditionalDETR-R50-50ep.*conditional-detr://DETR-R50-500ep",
    ):
        DetectionCheckpointer(torch.nn.Linear(1, 1)).load("conditional-detr://nope")


def test_get_builds_a_model():
    model = model_zoo.get("quick_schedules/conditional_detr_instant_test.yaml", device="cpu")
    assert isinstance(model, ConditionalDETR) and model.training
    assert model.num_classes == 5


@pytest.fixture
def official_path():
    return reference_file("official_r18_tiny.pth")


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch, official_path):
    """One tiny official checkpoint at a file:// URL, its config, a fresh cache, a download log."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CONDITIONAL_DETR_CACHE", str(cache))
    monkeypatch.setitem(
        OFFICIAL_CHECKPOINTS, TINY_NAME, OfficialCheckpoint(TINY_CONFIG, official_path.as_uri())
    )

    config_root = tmp_path / "configs"
    (config_root / "test").mkdir(parents=True)
    cfg = tiny_fixture_cfg()
    cfg.MODEL.DETR.NUM_CLASSES = CONVERTED_NUM_CLASSES
    (config_root / TINY_CONFIG).write_text(cfg.dump())
    monkeypatch.setattr(model_zoo_module, "CONFIG_ROOT", str(config_root))

    downloads = []
    real_download = model_zoo.checkpoint_handler.download

    def logged_download(url, destination, sha256_prefix=None):
        downloads.append(url)
        real_download(url, destination, sha256_prefix)

    monkeypatch.setattr(model_zoo.checkpoint_handler, "download", logged_download)
    return cache, downloads


def assert_cache_holds_only(cache, names):
    """No partial file or download folder is left behind."""
    assert sorted(f for f in os.listdir(cache) if not f.endswith(".lock")) == sorted(names)


def test_download_convert_cache(tiny_zoo, official_path):
    cache, downloads = tiny_zoo
    model = model_zoo.get(TINY_CONFIG, trained=True)
    assert downloads == [official_path.as_uri()]
    assert_cache_holds_only(cache, [TINY_NAME + ".pth"])

    expected = official_formats.convert_state_dict(
        official_formats.load_official_checkpoint(official_path)
    )
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key

    # the second load reads the cache, through detectron2's own checkpointer too
    again = build_model(model_zoo.get_config(TINY_CONFIG))
    DetectionCheckpointer(again).load(SCHEME + TINY_NAME)
    assert downloads == [official_path.as_uri()]
    for key, value in expected.items():
        assert torch.equal(again.state_dict()[key], value), key


@pytest.fixture
def detr_zoo(tmp_path, monkeypatch):
    """One tiny official DETR checkpoint at a file:// URL, and a fresh cache."""
    monkeypatch.setenv("CONDITIONAL_DETR_CACHE", str(tmp_path / "cache"))
    detr_path = reference_file("official_detr_r18_tiny.pth")
    monkeypatch.setitem(
        OFFICIAL_CHECKPOINTS, "Tiny-DETR-R18", OfficialCheckpoint("", detr_path.as_uri())
    )
    return detr_path


def test_detr_checkpoint_is_cached_as_converted(detr_zoo):
    converted = torch.load(PathManager.get_local_path(SCHEME + "Tiny-DETR-R18"), weights_only=True)
    expected = official_formats.convert_state_dict(
        official_formats.load_official_checkpoint(detr_zoo)
    )
    assert converted["model"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(converted["model"][key], value), key


def test_truncated_download_gives_a_clear_error_and_no_cache_entry(
    tiny_zoo, tmp_path, official_path
):
    cache, downloads = tiny_zoo
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(official_path.read_bytes()[: official_path.stat().st_size // 2])
    OFFICIAL_CHECKPOINTS[TINY_NAME] = OfficialCheckpoint(TINY_CONFIG, truncated.as_uri())
    with pytest.raises(
        RuntimeError,
        match=r"conditional-detr://Tiny-R18: .*truncated\.pth is not a readable official "
        r"checkpoint.*nothing was cached",
    ):
        model_zoo.get(TINY_CONFIG, trained=True)
    assert_cache_holds_only(cache, [])

    # a later good download is not disturbed
    OFFICIAL_CHECKPOINTS[TINY_NAME] = OfficialCheckpoint(TINY_CONFIG, official_path.as_uri())
    model_zoo.get(TINY_CONFIG, trained=True)
    assert_cache_holds_only(cache, [TINY_NAME + ".pth"])


def test_interrupted_download_and_wrong_hash_leave_no_cache_entry(
    tiny_zoo, monkeypatch, official_path
):
    cache, _ = tiny_zoo

    def interrupted(url, destination, sha256_prefix=None):
        with open(destination, "wb") as f:
            f.write(official_path.read_bytes()[:1000])
        raise ConnectionResetError("connection reset by peer")

    with monkeypatch.context() as patch:
        patch.setattr(model_zoo.checkpoint_handler, "download", interrupted)
        with pytest.raises(
            RuntimeError,
            match=r"Tiny-R18: downloading file://.* failed \(connection reset by peer\); nothing was cached",
        ):
            model_zoo.get(TINY_CONFIG, trained=True)
    assert_cache_holds_only(cache, [])

    OFFICIAL_CHECKPOINTS[TINY_NAME] = OfficialCheckpoint(
        TINY_CONFIG, official_path.as_uri(), sha256_prefix="00000000"
    )
    with pytest.raises(RuntimeError, match=r"Tiny-R18: downloading .* failed \(invalid hash value"):
        model_zoo.get(TINY_CONFIG, trained=True)
    assert_cache_holds_only(cache, [])


def test_share_page_checkpoint_is_used_once_saved_by_hand(tiny_zoo, official_path):
    cache, downloads = tiny_zoo
    OFFICIAL_CHECKPOINTS[TINY_NAME] = OfficialCheckpoint(
        TINY_CONFIG, None, page="https://example.org/share"
    )
    saved_by_user = cache / "official" / (TINY_NAME + ".pth")
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"https://example.org/share . Download it there and save it as {saved_by_user}"
        ),
    ):
        model_zoo.get(TINY_CONFIG, trained=True)

    saved_by_user.parent.mkdir(parents=True)
    shutil.copy(official_path, saved_by_user)
    model_zoo.get(TINY_CONFIG, trained=True)
    assert downloads == []
    assert (cache / (TINY_NAME + ".pth")).is_file() and saved_by_user.is_file()


def test_torchvision_imagenet_backbone_is_converted_and_cached(tmp_path, monkeypatch):
    """The R101 configs' initialization: a torchvision ResNet becomes `backbone.*` weights."""
    import torchvision

    monkeypatch.setenv("CONDITIONAL_DETR_CACHE", str(tmp_path / "cache"))
    resnet = torchvision.models.resnet18(weights=None)
    source = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), source)
    name = "ImageNet/torchvision-R-18"
    monkeypatch.setitem(
        OFFICIAL_CHECKPOINTS,
        name,
        OfficialCheckpoint(None, source.as_uri(), kind="torchvision-resnet"),
    )
    cfg = tiny_fixture_cfg()
    cfg.MODEL.WEIGHTS = SCHEME + name
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    backbone = model.state_dict()
    assert torch.equal(backbone["backbone.stem.conv1.weight"], resnet.conv1.weight)
    assert torch.equal(backbone["backbone.res5.1.conv2.norm.running_var"], resnet.layer4[1].bn2.running_var)
    assert torch.equal(backbone["backbone.res3.0.shortcut.weight"], resnet.layer2[0].downsample[0].weight)
    assert os.path.isfile(tmp_path / "cache" / "ImageNet" / "torchvision-R-18.pth")
    assert "fc.weight" not in torch.load(tmp_path / "cache" / "ImageNet" / "torchvision-R-18.pth")["model"]


def test_r101_configs_start_from_torchvision_resnet101():
    for config_path in model_zoo.list_configs():
        cfg = model_zoo.get_config(config_path)
        if cfg.MODEL.RESNETS.DEPTH == 101 and not cfg.MODEL.MASK_ON:  # the mask stage starts from its box model
            assert cfg.MODEL.WEIGHTS == SCHEME + "ImageNet/torchvision-R-101", config_path
            assert official_checkpoint_of(cfg.MODEL.WEIGHTS).kind == "torchvision-resnet"


def official_checkpoint_of(weights):
    return OFFICIAL_CHECKPOINTS[weights[len(SCHEME) :]]


def test_deformable_detr_checkpoint_saved_by_hand_loads_into_its_config(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDITIONAL_DETR_CACHE", str(tmp_path / "cache"))
    name = "DeformableDETR-R50-two-stage-50ep"
    config = "COCO-Detection/deformable_detr_R_50_two_stage_50ep.yaml"
    assert OFFICIAL_CHECKPOINTS[name].page.startswith("https://drive.google.com/")
    assert model_zoo.get_config(config, trained=True).MODEL.WEIGHTS == SCHEME + name
    # an official-format file with the official keys and shapes, as the share page gives it
    generator = torch.Generator().manual_seed(0)
    official = {}
    for key, shape in official_keys("official_deformable_r50_two_stage_keys.txt").items():
        official[key] = torch.randn(shape, generator=generator)
    saved_by_user = tmp_path / "cache" / "official" / (name + ".pth")
    saved_by_user.parent.mkdir(parents=True)
    torch.save({"model": official}, saved_by_user)

    model = model_zoo.get(config, trained=True, device="cpu")
    state = model.state_dict()
    key = "transformer.encoder.layers.3.self_attn.sampling_offsets.weight"
    assert torch.equal(state[key], official[key])
    assert torch.equal(state["backbone.res4.2.conv1.weight"], official["backbone.0.body.layer3.2.conv1.weight"])
    rows = class_heads.coco_contiguous_to_category_id()
    assert torch.equal(state["class_embed.2.weight"], official["class_embed.2.weight"][rows])


@pytest.mark.slow
def test_importing_the_package_leaves_the_trainer_out():
    code = (
        "import sys, conditional_detr\n"
        "for name in ('conditional_detr.engine', 'detectron2.engine'):\n"
        "    assert name not in sys.modules, name\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
