"""
Training-time groups of object queries (MODEL.DETR.QUERY_GROUPS, Group DETR):
groups attend only within themselves, are matched on their own, average their losses, and
leave inference to the first group, so that the deployed model is the paper's.
"""
import pytest
import torch
from detectron2.modeling import build_model

from conditional_detr.modeling import HungarianMatcher, SetCriterion
from conditional_detr.modeling.attention import ProjectedSelfAttention, within_groups

from helpers.tiny import (
    NUM_CLASSES, NUM_QUERIES, random_outputs, random_targets, tiny_batch, tiny_deformable_cfg, tiny_model,
)

GROUPS = 3


def test_groups_attend_only_within_themselves():
    torch.manual_seed(0)
    attention = ProjectedSelfAttention(16, nhead=4)
    q, k, v = (torch.randn(GROUPS * 5, 2, 16) for _ in range(3))
    grouped = within_groups(attention, GROUPS, q, k, v)
    separate = torch.cat([attention(*(x[g * 5 : (g + 1) * 5] for x in (q, k, v))) for g in range(GROUPS)])
    torch.testing.assert_close(grouped, separate)
    # one group is plain attention over every query
    torch.testing.assert_close(within_groups(attention, 1, q, k, v), attention(q, k, v))


def test_each_group_is_matched_on_its_own():
    matcher = HungarianMatcher()
    outputs = random_outputs(batch=3, num_queries=GROUPS * 7)
    targets = random_targets([2, 0, 5])
    grouped = matcher(outputs, targets, GROUPS)
    for g in range(GROUPS):
        group = {k: outputs[k][:, g * 7 : (g + 1) * 7] for k in ("pred_logits", "pred_boxes")}
        for (rows, columns), (group_rows, group_columns) in zip(grouped, matcher(group, targets)):
            in_group = (rows >= g * 7) & (rows < (g + 1) * 7)
            assert torch.equal(rows[in_group] - g * 7, group_rows)
            assert torch.equal(columns[in_group], group_columns)
    # every group matches every target once
    for (rows, columns), target in zip(grouped, targets):
        assert len(rows) == GROUPS * len(target["labels"])
        assert torch.equal(columns.bincount(minlength=len(target["labels"])), torch.full((len(target["labels"]),), GROUPS))


@pytest.mark.parametrize("class_loss", ["focal", "softmax"])
def test_identical_groups_give_the_one_group_losses(class_loss):
    logits = NUM_CLASSES + (class_loss == "softmax")
    outputs = random_outputs(batch=2, num_queries=7)
    for layer in [outputs] + outputs["aux_outputs"]:
        layer["pred_logits"] = torch.randn(2, 7, logits)
    repeated = {k: v.repeat(1, GROUPS, 1) for k, v in outputs.items() if k != "aux_outputs"}
    repeated["aux_outputs"] = [{k: v.repeat(1, GROUPS, 1) for k, v in aux.items()} for aux in outputs["aux_outputs"]]
    targets = random_targets([3, 1])

    def criterion(num_groups):
        return SetCriterion(NUM_CLASSES, HungarianMatcher(class_loss=class_loss), {}, class_loss=class_loss, num_groups=num_groups)

    one = criterion(1)(outputs, targets)
    grouped = criterion(GROUPS)(repeated, targets)
    assert one.keys() == grouped.keys()
    for key in one:
        torch.testing.assert_close(grouped[key], one[key], msg=key)


@pytest.mark.parametrize("architecture", ["ConditionalDETR", "DETR"])
def test_extra_groups_train_and_leave_inference_alone(architecture):
    grouped = tiny_model(QUERY_GROUPS=GROUPS, **{"MODEL.META_ARCHITECTURE": architecture})
    plain = tiny_model(**{"MODEL.META_ARCHITECTURE": architecture})
    assert grouped.group_query_embed.weight.shape[0] == (GROUPS - 1) * NUM_QUERIES
    # a checkpoint of the paper's model loads, the extra groups aside
    missing, unexpected = grouped.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["group_query_embed.weight"] and unexpected == []

    batch = tiny_batch()
    images = grouped.preprocess_image(batch)
    grouped.train()
    plain.train()
    with torch.no_grad():
        outputs = grouped.forward_outputs(images)
        expected = plain.forward_outputs(images)
    assert outputs["pred_logits"].shape[1] == GROUPS * NUM_QUERIES
    # the first group sees nothing of the others
    torch.testing.assert_close(outputs["pred_boxes"][:, :NUM_QUERIES], expected["pred_boxes"])
    torch.testing.assert_close(outputs["pred_logits"][:, :NUM_QUERIES], expected["pred_logits"])

    losses = grouped(batch)
    sum(losses.values()).backward()
    assert grouped.group_query_embed.weight.grad.abs().sum() > 0

    # the step moved the BatchNorms' statistics: back to the same weights for inference
    grouped.load_state_dict(plain.state_dict(), strict=False)
    grouped.eval()
    plain.eval()
    with torch.no_grad():
        for got, want in zip(grouped(batch), plain(batch)):
            torch.testing.assert_close(got["instances"].pred_boxes.tensor, want["instances"].pred_boxes.tensor)
            torch.testing.assert_close(got["instances"].scores, want["instances"].scores)


def test_deformable_detr_refuses_groups():
    cfg = tiny_deformable_cfg(**{"MODEL.DETR.QUERY_GROUPS": 2})
    with pytest.raises(ValueError, match="QUERY_GROUPS 1, got 2"):
        build_model(cfg)


def test_query_groups_below_one_are_refused():
    with pytest.raises(ValueError, match="QUERY_GROUPS must be >= 1, got 0"):
        tiny_model(QUERY_GROUPS=0)
