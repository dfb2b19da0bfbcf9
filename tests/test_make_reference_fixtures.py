"""
scripts/make_reference_fixtures.py writes the fixtures the fidelity tests read: on a stand-in
checkout (tests/data/fake_conditional_detr_checkout) the files, formats and shapes, and that
the outputs are those of the checkpoint it writes; with the official checkouts
($CONDITIONAL_DETR_OFFICIAL_CHECKOUTS: a folder holding ConditionalDETR, detr and
Deformable-DETR) every file, in the format of the stored ones.
"""
import json
import os
import re
from pathlib import Path

import pytest
import torch

from helpers.official import fixture_script
from helpers.paths import REFERENCE_DIR, REPO

make_reference_fixtures = fixture_script()  # puts scripts/ on the import path
from reference_fixtures import official_conditional_detr  # noqa: E402
from reference_fixtures.common import Checkout  # noqa: E402

FAKE_CHECKOUT = os.path.join(REPO, "tests", "data", "fake_conditional_detr_checkout")
OFFICIAL_CHECKOUTS = os.environ.get("CONDITIONAL_DETR_OFFICIAL_CHECKOUTS")
CHECKOUT_FOLDERS = {"conditional-detr": "ConditionalDETR", "detr": "detr", "deformable-detr": "Deformable-DETR"}


@pytest.fixture(scope="module")
def written(module_folder):
    output = module_folder("fixtures")
    names = make_reference_fixtures.main(["--conditional-detr", FAKE_CHECKOUT, "--output", str(output)])
    return output, names


def test_every_file_of_the_checkout_is_written(written):
    output, names = written
    assert sorted(names) == sorted(official_conditional_detr.FILES)
    assert sorted(os.listdir(output)) == sorted(names)


def test_the_checkpoint_is_float16_and_the_outputs_are_its_own(written):
    output, _ = written
    state = torch.load(output / "official_r18_tiny.pth")["model"]
    assert all(v.dtype == torch.float16 for v in state.values())
    # the re-initializations leave no constant that would hide a wrong mapping
    assert state["backbone.1.running_var"].unique().numel() > 1
    assert state["bbox_embed.layers.2.weight"].abs().max() > 0
    io = torch.load(output / "official_r18_tiny_io.pth")
    assert set(io) == {"images_uint8_rgb", "pred_logits", "pred_boxes", "aux_outputs", "postprocess",
                       "targets_coco_ids", "losses", "weight_dict"}
    assert [tuple(i.shape) for i in io["images_uint8_rgb"]] == [(3, 301, 457), (3, 389, 318)]
    assert io["pred_logits"].shape == (2, 30, 91) and len(io["aux_outputs"]) == 2
    assert [t["labels"].tolist() for t in io["targets_coco_ids"]] == [[1, 18, 90], [3]]
    assert set(io["losses"]) == set(io["weight_dict"])  # the weighted terms only
    assert [len(p["scores"]) for p in io["postprocess"]] == [100, 100]

    # the stand-in model of the args, on exactly the stored float16 values, gives the stored outputs
    args = json.loads((output / "official_r18_tiny_args.json").read_text())
    checkout = Checkout(FAKE_CHECKOUT)
    options = [f"--{k}={v}" for k, v in args.items()]
    model = checkout.build(options)[0].eval()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        outputs = model(checkout.samples(io["images_uint8_rgb"]))
    assert torch.equal(outputs["pred_logits"], io["pred_logits"])
    assert torch.equal(outputs["aux_outputs"][0]["pred_boxes"], io["aux_outputs"][0]["pred_boxes"])


def test_the_key_files_list_each_full_size_model(written):
    output, _ = written
    r50 = (output / "official_r50_keys.txt").read_text().splitlines()
    r101 = (output / "official_r101_keys.txt").read_text().splitlines()
    assert "class_embed.weight\t[91, 8]" in r50 and len(r101) > len(r50)


def test_a_folder_that_is_not_the_checkout_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_reference_fixtures.main(["--detr", FAKE_CHECKOUT, "--output", str(tmp_path)])
    assert f"--detr {FAKE_CHECKOUT}: no models/detr.py there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_reference_fixtures.main(["--output", str(tmp_path)])


def test_every_fixture_the_tests_read_has_a_writer():
    names = set()
    for test in Path(REPO, "tests").glob("test_*.py"):
        names |= set(re.findall(r"(?:reference_file|official_keys)\(\"([^\"{]+)\"\)", test.read_text()))
    assert len(names) > 10
    for name in names:
        flag, repository = make_reference_fixtures.writer_of(name)
        assert f"--{flag}" in make_reference_fixtures.__doc__ and repository in make_reference_fixtures.__doc__


@pytest.mark.slow
@pytest.mark.skipif(not OFFICIAL_CHECKOUTS, reason="CONDITIONAL_DETR_OFFICIAL_CHECKOUTS (a folder with checkouts of "
                    "ConditionalDETR, detr and Deformable-DETR) not set")
def test_the_official_checkouts_give_every_fixture_in_the_stored_format(tmp_path):
    argv = [a for flag, folder in CHECKOUT_FOLDERS.items() for a in (f"--{flag}", os.path.join(OFFICIAL_CHECKOUTS, folder))]
    names = make_reference_fixtures.main([*argv, "--output", str(tmp_path)])
    stored = Path(REFERENCE_DIR)
    if not stored.is_dir():
        pytest.skip(f"no stored fixtures in {REFERENCE_DIR} to compare the format with")
    assert sorted(names) == sorted(n for n in os.listdir(stored) if n != "README.md")
    for name in names:
        ours, theirs = tmp_path / name, stored / name
        if name.endswith((".txt", ".json")):  # keys and arguments: deterministic, equal to the byte
            assert ours.read_text() == theirs.read_text(), name
        else:
            assert same_structure(torch.load(ours), torch.load(theirs)), name


def same_structure(a, b):
    """
    The same keys, lengths, tensor shapes and dtypes, whatever the values; the number of
    panoptic segments depends on the values, the format of each does not.
    """
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
    if isinstance(a, dict) and "segments_info" in a:
        return same_structure(a["segment_ids"], b["segment_ids"]) and all(
            same_structure(segment, b["segments_info"][0]) for segment in a["segments_info"]
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_structure(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_structure(x, y) for x, y in zip(a, b))
    return type(a) is type(b)
