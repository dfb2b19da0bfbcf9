"""
Conditional DETR: the conditional decoder, whose cross-attention queries carry a spatial
part built from reference points (the paper's Section 3), with the ablations of its
Section 4.3, and the meta-architecture around it.
"""
import torch
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from .. import ops
from .attention import ConditionalCrossAttention, ProjectedSelfAttention, within_groups
from .box_ops import inverse_sigmoid
from .detector import SingleLevelDetector, config_choice
from .norms import LayerNorm
from .transformer import MLP, add_feed_forward_and_norms, feed_forward


class ConditionalDecoderLayer(nn.Module):
    """
    Decoder layer with separate content and positional projections. In the
    cross-attention the query is [content, spatial] per head, the spatial part being
    the projected conditional spatial query; only the first layer also adds the
    object query's positional projection to the content query and key (`is_first`).
    """

    def __init__(self, d_model, nhead, dim_feedforward, dropout, is_first):
        super().__init__()
        self.is_first = is_first

        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = ProjectedSelfAttention(d_model, nhead, dropout)

        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if is_first else None
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = ConditionalCrossAttention(d_model, nhead, dropout)

        add_feed_forward_and_norms(self, d_model, dim_feedforward, dropout, num_residuals=3)

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos, spatial_query, num_groups=1):
        """
        Args:
            tgt: [num_queries, batch, d_model] decoder embeddings.
            memory, pos: [hw, batch, d_model] encoder output and its positional encoding.
            memory_key_padding_mask: [batch, hw] bool.
            query_pos: [num_queries, batch or 1, d_model] object queries.
            spatial_query: [num_queries, batch, d_model] λq ⊙ sinusoidal(reference points).
            num_groups: query groups that attend only within themselves (see `within_groups`).
        """
        content_query = self.self_attention(tgt, query_pos, num_groups)
        return self.cross_attention_and_feed_forward(
            content_query, memory, memory_key_padding_mask, pos, query_pos, spatial_query
        )

    def self_attention(self, tgt, query_pos, num_groups=1):
        """Returns the content query c_q of the cross-attention."""
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt2 = within_groups(self.self_attn, num_groups, q, k, self.sa_v_proj(tgt))
        return self.norm1(tgt + self.dropout1(tgt2))

    def cross_attention_and_feed_forward(
        self, tgt, memory, memory_key_padding_mask, pos, query_pos, spatial_query
    ):
        q_content = self.ca_qcontent_proj(tgt)
        k_content = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.is_first:
            q_content = q_content + self.ca_qpos_proj(query_pos)
            k_content = k_content + k_pos
        tgt2 = self.cross_attn(
            q_content, self.ca_qpos_sine_proj(spatial_query), k_content, k_pos,
            self.ca_v_proj(memory), memory_key_padding_mask,
        )
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        return self.norm3(tgt + self.dropout3(feed_forward(self, tgt)))


# Section 4.3: where the reference points s come from
REFERENCE_POINTS = ("predicted", "learned", "zero")
# Table 3: what the conditional spatial query is made of
SPATIAL_QUERIES = ("CSQ", "CSQ-C", "CSQ-T", "CSQ-P", "CSQ-I")
# Figure 5: the form of the transformation T applied to sinusoidal(s)
TRANSFORMATIONS = ("diagonal", "identity", "scalar", "block", "full")


def transformation_size(form, d_model, nhead):
    """Numbers the query_scale FFN predicts per query to form T."""
    head_dim = d_model // nhead
    return {"identity": 0, "scalar": 1, "diagonal": d_model, "block": d_model * head_dim, "full": d_model**2}[form]


def apply_transformation(form, transformation, positional, nhead):
    """
    T p_s for T predicted as `transformation` [num_queries, batch, transformation_size]
    and p_s `positional` [num_queries, batch, d_model]; "diagonal" is done by the caller.
    """
    if form == "scalar":
        return transformation * positional
    d_model = positional.shape[-1]
    blocks = nhead if form == "block" else 1
    block = d_model // blocks
    matrices = transformation.unflatten(-1, (blocks, block, block))
    return (matrices @ positional.unflatten(-1, (blocks, block, 1))).flatten(-3)


class ConditionalDecoder(nn.Module):
    """
    Forms one reference point per object query, then runs the decoder layers, each
    with a conditional spatial query. The paper's method (the defaults): reference
    points predicted from the object queries (`ref_point_head`), and the spatial query
    λq ⊙ sinusoidal(reference), λq predicted by `query_scale` from the layer's input
    embedding f (identity in the first layer). The paper's ablations:

    - reference_points: "learned" (a free 2D point per query) or "zero" (DETR's s = 0,
      the image centre after the sigmoid);
    - spatial_query: "CSQ-C" the embedding f itself, "CSQ-T" λq alone (ones in the
      first layer), "CSQ-P" sinusoidal(reference) alone, "CSQ-I" λq predicted from the
      layer's self-attention output c_q instead of f;
    - transformation: the form of T in T p_s, predicted by `query_scale`: "diagonal"
      (λq), "identity" (none), "scalar", "block" (one head_dim x head_dim block per
      head) or "full" (d_model x d_model).
    """

    ops_impl = "auto"  # for the spatial query op, set by ops.set_implementation

    def __init__(
        self, d_model, nhead, num_layers, dim_feedforward, dropout,
        reference_points="predicted", spatial_query="CSQ", transformation="diagonal",
        num_queries=None,
    ):
        super().__init__()
        for name, value, choices in (
            ("reference_points", reference_points, REFERENCE_POINTS),
            ("spatial_query", spatial_query, SPATIAL_QUERIES),
            ("transformation", transformation, TRANSFORMATIONS),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if spatial_query in ("CSQ-C", "CSQ-T", "CSQ-P") and transformation != "diagonal":
            raise ValueError(f"spatial_query {spatial_query!r} uses no transformation form; got {transformation!r}")
        self.layers = nn.ModuleList(
            ConditionalDecoderLayer(d_model, nhead, dim_feedforward, dropout, i == 0)
            for i in range(num_layers)
        )
        self.norm = LayerNorm(d_model)
        self.nhead = nhead
        self.reference_points = reference_points
        self.spatial_query_form = spatial_query
        self.transformation = "identity" if spatial_query in ("CSQ-C", "CSQ-P") else transformation
        size = transformation_size(self.transformation, d_model, nhead)
        self.query_scale = MLP(d_model, d_model, size, 2) if size else None
        self.ref_point_head = MLP(d_model, d_model, 2, 2) if reference_points == "predicted" else None
        # unnormalized, as the paper's s; the meta-architecture spreads them over the image
        self.reference_point_embed = nn.Embedding(num_queries, 2) if reference_points == "learned" else None

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos, num_groups=1):
        """
        The queries may come in `num_groups` groups that attend only within themselves.

        Returns:
            hs: [num_layers, batch, num_queries, d_model], every layer's output after the
                shared final norm.
            reference_points: [batch, num_queries, 2] normalized (x, y).
        """
        reference_points = self.normalized_reference_points(query_pos, tgt.shape[1])  # [num_queries, batch, 2]
        output = tgt
        intermediate = []
        for layer in self.layers:
            content_query = layer.self_attention(output, query_pos, num_groups)
            spatial_query = self.spatial_query(output, content_query, reference_points, layer.is_first)
            output = layer.cross_attention_and_feed_forward(
                content_query, memory, memory_key_padding_mask, pos, query_pos, spatial_query
            )
            intermediate.append(self.norm(output))
        return torch.stack(intermediate).transpose(1, 2), reference_points.transpose(0, 1)

    def normalized_reference_points(self, query_pos, batch):
        num_queries = query_pos.shape[0]
        if self.reference_points == "predicted":
            return self.ref_point_head(query_pos).sigmoid().expand(num_queries, batch, 2)
        if self.reference_points == "learned":
            return self.reference_point_embed.weight.sigmoid().unsqueeze(1).expand(num_queries, batch, 2)
        return query_pos.new_full((num_queries, batch, 2), 0.5)  # sigmoid(0)

    def spatial_query(self, layer_input, content_query, reference_points, is_first):
        """The conditional spatial query before its projection: [num_queries, batch, d_model]."""
        form = self.spatial_query_form
        if form == "CSQ-C":
            return layer_input
        identity = layer_input.new_ones(()).expand_as(layer_input)
        # the first layer's input is zeros: T is the identity there, as in the official code
        if is_first or self.query_scale is None:
            transformation = None
        else:
            transformation = self.query_scale(content_query if form == "CSQ-I" else layer_input)
        if form == "CSQ-T":
            return identity if transformation is None else transformation
        if transformation is not None and self.transformation == "diagonal":
            return ops.conditional_spatial_query(reference_points, transformation, impl=self.ops_impl)
        positional = ops.conditional_spatial_query(reference_points, identity, impl=self.ops_impl)
        if transformation is None:
            return positional
        return apply_transformation(self.transformation, transformation, positional, self.nhead)



@META_ARCH_REGISTRY.register()
class ConditionalDETR(SingleLevelDetector):
    """
    Conditional DETR: a ResNet, DETR's encoder, the conditional decoder, and shared
    class and box heads. Boxes are predicted as offsets from each query's reference
    point in the sigmoid-inverse space (the paper's equation 1), or on their own with
    MODEL.CONDITIONAL_DETR.BOX_OFFSET off. The ablations of the paper's Section 4.3 are
    MODEL.CONDITIONAL_DETR.REFERENCE_POINTS, SPATIAL_QUERY, TRANSFORMATION and BOX_OFFSET,
    and MODEL.DETR.CLASS_LOSS (see `ConditionalDecoder`).
    """

    own_config_node = "CONDITIONAL_DETR"

    def __init__(self, cfg):
        reference_points = config_choice(cfg, "REFERENCE_POINTS", REFERENCE_POINTS, "MODEL.CONDITIONAL_DETR")
        spatial_query = config_choice(cfg, "SPATIAL_QUERY", SPATIAL_QUERIES, "MODEL.CONDITIONAL_DETR")
        transformation = config_choice(cfg, "TRANSFORMATION", TRANSFORMATIONS, "MODEL.CONDITIONAL_DETR")
        if spatial_query in ("CSQ-C", "CSQ-T", "CSQ-P") and transformation != "diagonal":
            raise ValueError(
                f"MODEL.CONDITIONAL_DETR.SPATIAL_QUERY {spatial_query!r} has no transformation T to "
                f"shape: MODEL.CONDITIONAL_DETR.TRANSFORMATION must stay 'diagonal', got {transformation!r}"
            )

        def build_decoder(args):
            return ConditionalDecoder(
                args.HIDDEN_DIM, args.NHEADS, args.DEC_LAYERS, args.DIM_FEEDFORWARD, args.DROPOUT,
                reference_points, spatial_query, transformation,
                args.NUM_OBJECT_QUERIES,
            )

        super().__init__(cfg, build_decoder)
        self.box_offset = cfg.MODEL.CONDITIONAL_DETR.BOX_OFFSET
        # boxes start at the reference points
        nn.init.constant_(self.bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(self.bbox_embed.layers[-1].bias, 0)
        learned_points = self.transformer.decoder.reference_point_embed
        if learned_points is not None:
            # spread over the image, where xavier would gather them at its centre
            learned_points.weight.data = inverse_sigmoid(torch.rand_like(learned_points.weight))

    def predict_boxes(self, hs, reference):
        box_offsets = self.bbox_embed(hs)
        if not self.box_offset:
            return box_offsets.sigmoid()
        return torch.cat(
            [box_offsets[..., :2] + inverse_sigmoid(reference), box_offsets[..., 2:]], dim=-1
        ).sigmoid()
