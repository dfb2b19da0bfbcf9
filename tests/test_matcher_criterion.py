"""
The Hungarian matcher and the set criterion: one-to-one minimal matching, empty targets,
every decoder layer's losses.
"""
import pytest
import torch

from conditional_detr.modeling import HungarianMatcher, SetCriterion

from helpers.tiny import NUM_CLASSES, random_outputs, random_targets

def image(outputs, i):
    one = {k: v[i : i + 1] for k, v in outputs.items() if k != "aux_outputs"}
    one["aux_outputs"] = [{k: v[i : i + 1] for k, v in aux.items()} for aux in outputs["aux_outputs"]]
    return one


def build_criterion():
    weights = {"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2}
    return SetCriterion(NUM_CLASSES, HungarianMatcher(), weights)


def test_matching_is_one_to_one_and_minimal():
    outputs, targets = random_outputs(2), random_targets([3, 5])
    indices = HungarianMatcher()(outputs, targets)
    for (src, tgt), target in zip(indices, targets):
        assert len(src) == len(tgt) == len(target["labels"])
        assert len(set(src.tolist())) == len(src)
        assert sorted(tgt.tolist()) == list(range(len(target["labels"])))


def test_matcher_prefers_the_exact_prediction():
    outputs, targets = random_outputs(1), random_targets([1])
    outputs["pred_boxes"][0, 4] = targets[0]["boxes"][0]
    outputs["pred_logits"][0, 4, targets[0]["labels"][0]] = 10.0
    (src, tgt), = HungarianMatcher()(outputs, targets)
    assert src.tolist() == [4] and tgt.tolist() == [0]


def test_empty_targets():
    outputs, targets = random_outputs(2), random_targets([0, 0])
    indices = HungarianMatcher()(outputs, targets)
    assert all(len(src) == 0 and len(tgt) == 0 for src, tgt in indices)
    losses = build_criterion()(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0
    # with no object, the classification loss still pushes every score down
    assert losses["loss_ce"] > 0


def test_losses_include_every_decoder_layer():
    losses = build_criterion()(random_outputs(2, num_layers=3), random_targets([2, 1]))
    assert set(losses) == {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou") for s in ("", "_0", "_1")}


def test_single_and_batched_agree():
    outputs, targets = random_outputs(3), random_targets([2, 0, 4])
    criterion = build_criterion()
    batched_indices = criterion.matcher(outputs, targets)
    for i in range(3):
        (src, tgt), = criterion.matcher(image(outputs, i), targets[i : i + 1])
        assert torch.equal(src, batched_indices[i][0]) and torch.equal(tgt, batched_indices[i][1])

    # losses are sums normalized by the box count: per-image sums add up to the batch
    batched = criterion(outputs, targets)
    total_boxes = sum(len(t["labels"]) for t in targets)
    for name, value in batched.items():
        summed = sum(
            criterion(image(outputs, i), targets[i : i + 1])[name] * max(len(targets[i]["labels"]), 1)
            for i in range(3)
        )
        if name.startswith("loss_ce"):
            assert value * total_boxes == pytest.approx(summed.item(), rel=1e-5)
        else:
            assert value * total_boxes == pytest.approx(summed.item(), rel=1e-5, abs=1e-6)


def test_loss_gradients_reach_predictions():
    outputs, targets = random_outputs(2), random_targets([2, 3])
    for layer in [outputs] + outputs["aux_outputs"]:
        layer["pred_logits"].requires_grad_(True)
        layer["pred_boxes"].requires_grad_(True)
    losses = build_criterion()(outputs, targets)
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0
    assert outputs["pred_boxes"].grad.abs().sum() > 0


def test_the_criterion_computes_the_losses_it_is_given():
    outputs, targets = random_outputs(2), random_targets([3, 5])
    weights = {"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2}
    both = SetCriterion(NUM_CLASSES, HungarianMatcher(), weights)(outputs, targets)
    labels_only = SetCriterion(NUM_CLASSES, HungarianMatcher(), weights, losses=("labels",))(outputs, targets)
    assert set(labels_only) == {"loss_ce", "loss_ce_0"}
    assert all(torch.equal(labels_only[k], both[k]) for k in labels_only)
    with pytest.raises(ValueError, match="unknown set loss 'segments': SetCriterion has no loss_segments"):
        SetCriterion(NUM_CLASSES, HungarianMatcher(), weights, losses=("labels", "segments"))
