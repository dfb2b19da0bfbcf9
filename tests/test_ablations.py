"""
The paper's ablations (Section 4.3: reference points, Table 3: the conditional spatial
query, Figure 5: the transformation T, Table 4: focal loss and box offset regression)
as MODEL.CONDITIONAL_DETR and MODEL.DETR switches, and the DETR baseline: each builds, trains a step
on tiny images and changes what it should.
"""
import pytest
import torch

from conditional_detr import ops
from conditional_detr.modeling.backbone import feature_padding_mask
from conditional_detr.modeling.conditional_detr import apply_transformation

from helpers.tiny import HIDDEN_DIM, NHEADS, NUM_QUERIES, detector_node, tiny_batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def train_step(model):
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = model(tiny_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    optimizer.step()
    return losses


def decoder_run(model, seed=0):
    """Reference points and layer outputs of the decoder for the tiny batch."""
    model.eval()
    with torch.no_grad():
        images = model.preprocess_image(tiny_batch(seed))
        features = model.backbone(images.tensor)[model.feature_name]
        mask = feature_padding_mask(images.image_sizes, images.tensor.shape[-2:], features.shape[-2:], "cpu")
        pos = model.position_embedding(mask)
        out = model.transformer(model.input_proj(features), mask, model.query_embed.weight, pos)
        return out["hs"], out["reference"]


ABLATIONS = {
    "paper": {},
    "reference_zero": {"REFERENCE_POINTS": "zero"},
    "reference_learned": {"REFERENCE_POINTS": "learned"},
    "CSQ-C": {"SPATIAL_QUERY": "CSQ-C"},
    "CSQ-T": {"SPATIAL_QUERY": "CSQ-T"},
    "CSQ-P": {"SPATIAL_QUERY": "CSQ-P"},
    "CSQ-I": {"SPATIAL_QUERY": "CSQ-I"},
    "T_identity": {"TRANSFORMATION": "identity"},
    "T_scalar": {"TRANSFORMATION": "scalar"},
    "T_block": {"TRANSFORMATION": "block"},
    "T_full": {"TRANSFORMATION": "full"},
    "softmax": {"CLASS_LOSS": "softmax"},
    "no_box_offset": {"BOX_OFFSET": False},
    "detr": {"MODEL.META_ARCHITECTURE": "DETR", "CLASS_LOSS": "softmax"},
    "detr_focal": {"MODEL.META_ARCHITECTURE": "DETR"},
}


@pytest.mark.parametrize("overrides", ABLATIONS.values(), ids=ABLATIONS.keys())
def test_builds_trains_and_infers(overrides):
    model = tiny_model(**overrides)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_step(model)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"} <= set(losses)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("transformer.decoder.") for k in changed)
    model.eval()
    with torch.no_grad():
        results = model([{k: v for k, v in x.items() if k != "instances"} for x in tiny_batch()])
    assert all(len(r["instances"]) > 0 for r in results)


def test_query_scale_shape_follows_the_transformation():
    head_dim = HIDDEN_DIM // NHEADS
    expected = {"diagonal": HIDDEN_DIM, "scalar": 1, "block": HIDDEN_DIM * head_dim, "full": HIDDEN_DIM**2}
    for form, size in expected.items():
        query_scale = tiny_model(TRANSFORMATION=form).transformer.decoder.query_scale
        assert query_scale.layers[-1].out_features == size, form
    assert tiny_model(TRANSFORMATION="identity").transformer.decoder.query_scale is None
    for form in ("CSQ-C", "CSQ-P"):
        assert tiny_model(SPATIAL_QUERY=form).transformer.decoder.query_scale is None


def test_block_and_full_transformations_are_matrix_products():
    torch.manual_seed(0)
    positional = torch.randn(3, 2, HIDDEN_DIM)
    head_dim = HIDDEN_DIM // NHEADS
    blocks = torch.randn(3, 2, NHEADS, head_dim, head_dim)
    full = torch.zeros(3, 2, HIDDEN_DIM, HIDDEN_DIM)
    for h in range(NHEADS):
        full[..., h * head_dim:(h + 1) * head_dim, h * head_dim:(h + 1) * head_dim] = blocks[:, :, h]
    expected = (full @ positional.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(apply_transformation("block", blocks.flatten(-3), positional, NHEADS), expected)
    torch.testing.assert_close(apply_transformation("full", full.flatten(-2), positional, NHEADS), expected)
    # a diagonal full matrix gives the paper's λq ⊙ p_s
    scale = torch.randn(3, 2, HIDDEN_DIM)
    torch.testing.assert_close(
        apply_transformation("full", torch.diag_embed(scale).flatten(-2), positional, NHEADS), scale * positional
    )


def test_reference_points():
    zero = tiny_model(REFERENCE_POINTS="zero")
    assert zero.transformer.decoder.ref_point_head is None
    assert torch.equal(decoder_run(zero)[1], torch.full((2, NUM_QUERIES, 2), 0.5))

    learned = tiny_model(REFERENCE_POINTS="learned")
    decoder = learned.transformer.decoder
    assert decoder.ref_point_head is None and decoder.reference_point_embed.weight.shape == (NUM_QUERIES, 2)
    points = decoder_run(learned)[1]
    # one point per query, the same for every image and input, spread over the image
    assert torch.equal(points[0], points[1]) and torch.equal(points, decoder_run(learned, seed=1)[1])
    assert points[0].std(0).min() > 0.1
    with torch.no_grad():
        learned.query_embed.weight.normal_()
    assert torch.equal(points, decoder_run(learned)[1])
    train_step(learned)
    assert not torch.equal(points, decoder_run(learned)[1])

    predicted = tiny_model()
    assert predicted.transformer.decoder.reference_point_embed is None
    points = decoder_run(predicted)[1]
    with torch.no_grad():
        predicted.query_embed.weight.normal_()
    assert not torch.equal(points, decoder_run(predicted)[1])


@pytest.mark.parametrize("form", ["CSQ", "CSQ-C", "CSQ-T", "CSQ-P", "CSQ-I"])
def test_spatial_query_forms(form):
    decoder = tiny_model(SPATIAL_QUERY=form).transformer.decoder
    torch.manual_seed(1)
    layer_input, content_query = torch.randn(2, NUM_QUERIES, 3, HIDDEN_DIM).unbind(0)
    reference = torch.rand(NUM_QUERIES, 3, 2)
    positional = ops.reference.sine_embedding(reference, HIDDEN_DIM)
    with torch.no_grad():
        query = decoder.spatial_query(layer_input, content_query, reference, is_first=False)
        first = decoder.spatial_query(layer_input, content_query, reference, is_first=True)
        expected = {
            "CSQ": lambda: decoder.query_scale(layer_input) * positional,
            "CSQ-C": lambda: layer_input,
            "CSQ-T": lambda: decoder.query_scale(layer_input),
            "CSQ-P": lambda: positional,
            "CSQ-I": lambda: decoder.query_scale(content_query) * positional,
        }[form]()
    torch.testing.assert_close(query, expected)
    # T is the identity in the first layer
    expected_first = {"CSQ-C": layer_input, "CSQ-T": torch.ones_like(layer_input)}.get(form, positional)
    torch.testing.assert_close(first, expected_first)


def test_class_loss_switches_head_loss_and_inference():
    focal, softmax = tiny_model(), tiny_model(CLASS_LOSS="softmax", NO_OBJECT_WEIGHT=0.25)
    assert focal.class_embed.out_features == 5 and softmax.class_embed.out_features == 6
    assert focal.criterion.class_loss == "focal" and softmax.criterion.class_loss == "softmax"
    assert softmax.criterion.matcher.class_loss == "softmax"
    assert softmax.criterion.softmax_class_weight.tolist() == [1, 1, 1, 1, 1, 0.25]
    # the focal prior starts every class at 0.01; softmax keeps the default init
    assert torch.allclose(focal.class_embed.bias.sigmoid(), torch.tensor(0.01))
    assert not torch.allclose(softmax.class_embed.bias.sigmoid(), torch.tensor(0.01))

    logits = torch.randn(2, NUM_QUERIES, 6)
    boxes = torch.rand(2, NUM_QUERIES, 4) * 0.5 + 0.25
    results = softmax.inference(logits, boxes, [(48, 64), (56, 40)])
    # one detection per query, its best class other than "no object"
    assert all(len(r) == NUM_QUERIES for r in results)
    assert torch.equal(results[0].pred_classes, logits[0, :, :5].argmax(-1))
    torch.testing.assert_close(results[0].scores, logits[0].softmax(-1)[:, :5].max(-1).values)
    topk = focal.inference(logits[..., :5], boxes, [(48, 64), (56, 40)])
    assert all(len(r) == focal.num_topk for r in topk)

    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    losses = softmax.criterion(outputs, empty)
    # with no object the cross-entropy still pushes every query to "no object"
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.full((2 * NUM_QUERIES,), 5))
    torch.testing.assert_close(losses["loss_ce"], expected)


def test_box_offset_switch():
    hs = torch.randn(2, 2, NUM_QUERIES, HIDDEN_DIM)
    reference = torch.rand(2, NUM_QUERIES, 2)
    with_offset, without = tiny_model(), tiny_model(BOX_OFFSET=False)
    with torch.no_grad():
        torch.nn.init.normal_(with_offset.bbox_embed.layers[-1].weight)
        without.bbox_embed.load_state_dict(with_offset.bbox_embed.state_dict())
        boxes = with_offset.predict_boxes(hs, reference)
        plain = without.predict_boxes(hs, reference)
    torch.testing.assert_close(plain, without.bbox_embed(hs).sigmoid())
    torch.testing.assert_close(plain[..., 2:], boxes[..., 2:])
    assert not torch.allclose(plain[..., :2], boxes[..., :2])
    # boxes start at the reference points, with offsets from them
    zero_init = tiny_model()
    torch.testing.assert_close(zero_init.predict_boxes(hs, reference)[..., :2], reference.expand(2, -1, -1, -1))


@pytest.mark.parametrize(
    "key,value",
    [("REFERENCE_POINTS", "random"), ("SPATIAL_QUERY", "CSQ-X"), ("TRANSFORMATION", "sparse"), ("CLASS_LOSS", "bce")],
)
def test_bad_values_name_key_and_value(key, value):
    with pytest.raises(ValueError, match=rf"MODEL\.{detector_node(key)}\.{key}.*{value}"):
        tiny_model(**{key: value})


def test_spatial_query_without_transformation_refuses_a_form():
    with pytest.raises(ValueError, match=r"SPATIAL_QUERY 'CSQ-T'.*TRANSFORMATION.*'block'"):
        tiny_model(SPATIAL_QUERY="CSQ-T", TRANSFORMATION="block")
