"""
The Deformable DETR transformer: an encoder of multi-scale deformable self-attention over
every position of every feature level, and a decoder whose queries attend to the levels
around their reference points; optionally refining the reference boxes layer by layer
(box refinement) and taking the decoder's queries from the encoder's best proposals
(two-stage).
"""
import math

import torch
from torch import nn

from .attention import multihead_attention
from .box_ops import inverse_sigmoid
from .deformable_attention import MultiScaleDeformableAttention
from .norms import LayerNorm
from .transformer import Dropout, feed_forward


def level_sizes(spatial_shapes):
    """
    (H, W) of every level as 0-dim tensors rather than Python numbers, so that a traced
    export (tools/export) keeps the image size dynamic.
    """
    return [(spatial_shapes[level, 0], spatial_shapes[level, 1]) for level in range(spatial_shapes.shape[0])]


def pixel_centres(size, device, offset=0.5):
    """0.5, 1.5, ... for `size` positions (offset 0: 0, 1, ...)."""
    return torch.arange(size, dtype=torch.float32, device=device) + offset


class DeformableEncoderLayer(nn.Module):
    """Post-norm: deformable self-attention from every position, then the feed-forward block."""

    def __init__(self, d_model, dim_feedforward, dropout, num_levels, nhead, num_points):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(d_model, num_levels, nhead, num_points)
        self.dropout1 = Dropout(dropout)
        self.norm1 = LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)  # inside the feed-forward block
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout2 = Dropout(dropout)
        self.norm2 = LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        return self.norm2(src + self.dropout2(feed_forward(self, src)))


class DeformableEncoder(nn.Module):
    def __init__(self, num_layers, **layer_args):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_args) for _ in range(num_layers))

    @staticmethod
    def reference_points(spatial_shapes, valid_ratios):
        """
        The centre of every position of every level, normalized by the unpadded extent of
        its own level, then seen from every level: [batch, sum of H*W, num_levels, 2] (x, y).
        """
        points = []
        for level, (h, w) in enumerate(level_sizes(spatial_shapes)):
            device = valid_ratios.device
            y, x = torch.meshgrid(pixel_centres(h, device), pixel_centres(w, device), indexing="ij")
            y = y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
            x = x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            points.append(torch.stack((x, y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos, padding_mask):
        reference_points = self.reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableDecoderLayer(nn.Module):
    """
    Post-norm: self-attention among the queries (positions on queries and keys), deformable
    cross-attention to the feature levels around the reference points, feed-forward.
    The official names: norm2 follows the self-attention, norm1 the cross-attention.
    """

    ops_impl = "auto"  # for the self-attention's dropout, set by ops.set_implementation

    def __init__(self, d_model, dim_feedforward, dropout, num_levels, nhead, num_points):
        super().__init__()
        self.cross_attn = MultiScaleDeformableAttention(d_model, num_levels, nhead, num_points)
        self.dropout1 = Dropout(dropout)
        self.norm1 = LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.dropout2 = Dropout(dropout)
        self.norm2 = LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)  # inside the feed-forward block
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = Dropout(dropout)
        self.norm3 = LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask):
        q = k = tgt + query_pos
        tgt2 = multihead_attention(self.self_attn, q, k, tgt, ops_impl=self.ops_impl)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        return self.norm3(tgt + self.dropout3(feed_forward(self, tgt)))


class DeformableDecoder(nn.Module):
    """
    The decoder layers; with box refinement, `bbox_embed` (the detector's per-layer box
    heads, set by the detector) moves the reference points after every layer, without
    gradient through the references themselves.
    """

    def __init__(self, num_layers, **layer_args):
        super().__init__()
        self.layers = nn.ModuleList(DeformableDecoderLayer(**layer_args) for _ in range(num_layers))
        self.num_layers = num_layers
        self.bbox_embed = None
        self.class_embed = None  # two-stage: the detector's class heads, the last one scoring proposals

    def forward(self, tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios,
                query_pos, padding_mask):
        """
        Returns every layer's output [num_layers, batch, num_queries, d_model] and the
        reference points after every layer [num_layers, batch, num_queries, 2 or 4].
        """
        output = tgt
        intermediate, references = [], []
        for index, layer in enumerate(self.layers):
            # the references are normalized by the unpadded image; each level sees them
            # normalized by its own padded map
            ratios = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
            level_points = reference_points[:, :, None] * ratios[:, None]
            output = layer(output, query_pos, level_points, memory, spatial_shapes, level_start_index, padding_mask)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[index](output)
                if reference_points.shape[-1] == 4:
                    refined = delta + inverse_sigmoid(reference_points)
                else:
                    refined = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1)
                reference_points = refined.sigmoid().detach()
            intermediate.append(output)
            references.append(reference_points)
        return torch.stack(intermediate), torch.stack(references)


def proposal_position_embedding(proposals, num_pos_feats, temperature=10000):
    """
    Sine embedding of each coordinate of unnormalized proposal boxes (before the sigmoid):
    [batch, num_proposals, 4] -> [batch, num_proposals, 4 * num_pos_feats]; the official
    model has num_pos_feats 128 for its width of 256.
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos = proposals.sigmoid()[..., None] * (2 * math.pi) / dim_t  # [batch, num_proposals, 4, num_pos_feats]
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)


class DeformableTransformer(nn.Module):
    """
    Flattens the feature levels with a learned embedding per level, runs the encoder, picks
    the decoder's queries and reference points, and runs the decoder.

    Plain and box-refine: the queries are learned, [num_queries, 2 * d_model] split into a
    position and a content half, and the reference points a linear function of the position.
    Two-stage: every encoder position proposes a box around itself (of a size growing with
    its level), scored and refined by the detector's last heads; the top `num_queries`
    proposals become the reference boxes and, through their sine embedding, the queries.
    """

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=1024, dropout=0.1, num_levels=4, enc_points=4, dec_points=4,
                 two_stage=False, num_queries=300):
        super().__init__()
        self.d_model = d_model
        self.two_stage = two_stage
        self.num_queries = num_queries
        layer_args = dict(
            d_model=d_model, dim_feedforward=dim_feedforward, dropout=dropout, num_levels=num_levels,
            nhead=nhead,
        )
        self.encoder = DeformableEncoder(num_encoder_layers, num_points=enc_points, **layer_args)
        self.decoder = DeformableDecoder(num_decoder_layers, num_points=dec_points, **layer_args)
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MultiScaleDeformableAttention):
                module.reset_parameters()
        if not self.two_stage:
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def valid_ratios(mask):
        """The unpadded fraction of a [batch, H, W] padding mask: [batch, 2] as (w, h)."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).float() / h
        valid_w = (~mask[:, 0, :]).sum(1).float() / w
        return torch.stack([valid_w, valid_h], -1)

    def encoder_proposals(self, memory, padding_mask, spatial_shapes):
        """
        One proposal per encoder position, unnormalized (inverse sigmoid), with +inf at
        padding and near the border, and the memory they are scored from (zeroed there).
        """
        batch = memory.shape[0]
        proposals = []
        start = 0
        for level, (h, w) in enumerate(level_sizes(spatial_shapes)):
            mask = padding_mask[:, start:start + h * w].view(batch, h, w)
            valid_h = (~mask[:, :, 0]).sum(1)
            valid_w = (~mask[:, 0, :]).sum(1)
            y, x = torch.meshgrid(
                pixel_centres(h, memory.device, 0), pixel_centres(w, memory.device, 0), indexing="ij"
            )
            grid = torch.stack([x, y], -1)  # [h, w, 2]
            scale = torch.stack([valid_w, valid_h], 1).view(batch, 1, 1, 2)
            centres = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
            sizes = torch.full_like(centres, 0.05 * 2.0**level)
            proposals.append(torch.cat((centres, sizes), -1).view(batch, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        invalid = padding_mask.unsqueeze(-1) | ~valid
        proposals = proposals.masked_fill(invalid, float("inf"))
        memory = memory.masked_fill(invalid, 0.0)
        return self.enc_output_norm(self.enc_output(memory)), proposals

    def forward(self, srcs, masks, pos_embeds, query_embed=None):
        """
        Args:
            srcs, pos_embeds: per level [batch, d_model, H, W]; masks: per level [batch, H, W].
            query_embed: [num_queries, 2 * d_model] learned queries (None for two-stage).
        Returns a dict: "hs" [num_layers, batch, num_queries, d_model], "init_reference"
        [batch, num_queries, 2 or 4], "inter_references" [num_layers, batch, num_queries,
        2 or 4], the encoder's output "memory" [batch, sum of HW, d_model] with its
        "memory_padding_mask" [batch, sum of HW], the flattening's "spatial_shapes",
        "level_start_index" and "valid_ratios", and for two-stage "enc_outputs_class" and
        "enc_outputs_coord_unact" of every encoder position.
        """
        # from the tensors' shapes, which a traced export keeps symbolic
        spatial_shapes = torch.stack([torch._shape_as_tensor(src)[-2:] for src in srcs]).to(srcs[0].device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.valid_ratios(m) for m in masks], 1)
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        mask_flatten = torch.cat([m.flatten(1) for m in masks], 1)
        pos_flatten = torch.cat(
            [pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1) for level, pos in enumerate(pos_embeds)],
            1,
        )
        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, valid_ratios, pos_flatten, mask_flatten)

        batch, _, channels = memory.shape
        outputs = {
            "memory": memory, "memory_padding_mask": mask_flatten, "spatial_shapes": spatial_shapes,
            "level_start_index": level_start_index, "valid_ratios": valid_ratios,
        }
        if self.two_stage:
            output_memory, proposals = self.encoder_proposals(memory, mask_flatten, spatial_shapes)
            proposal_head = self.decoder.num_layers
            enc_class = self.decoder.class_embed[proposal_head](output_memory)
            enc_coord_unact = self.decoder.bbox_embed[proposal_head](output_memory) + proposals
            top = torch.topk(enc_class[..., 0], self.num_queries, dim=1)[1]
            top_coords = torch.gather(enc_coord_unact, 1, top.unsqueeze(-1).repeat(1, 1, 4)).detach()
            reference_points = top_coords.sigmoid()
            query_pos, tgt = torch.split(
                self.pos_trans_norm(self.pos_trans(proposal_position_embedding(top_coords, channels // 2))), channels, dim=2
            )
            outputs.update(enc_outputs_class=enc_class, enc_outputs_coord_unact=enc_coord_unact)
        else:
            query_pos, tgt = torch.split(query_embed, channels, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()

        hs, inter_references = self.decoder(
            tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios, query_pos, mask_flatten
        )
        outputs.update(hs=hs, init_reference=reference_points, inter_references=inter_references)
        return outputs
