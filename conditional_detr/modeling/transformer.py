"""
The Conditional DETR transformer: DETR's encoder and the conditional decoder,
whose cross-attention queries carry a spatial part built from reference points.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .attention import ConditionalCrossAttention, ProjectedSelfAttention


class MLP(nn.Module):
    """A few linear layers with ReLU between them."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer; positions are added to queries and keys only."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src, key_padding_mask, pos):
        q = k = src + pos
        src2 = self.self_attn(q, k, value=src, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class TransformerEncoder(nn.Module):
    def __init__(self, d_model, nhead, num_layers, dim_feedforward, dropout):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers)
        )

    def forward(self, src, key_padding_mask, pos):
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos)
        return src


class ConditionalDecoderLayer(nn.Module):
    """
    Decoder layer with separate content and positional projections. In the
    cross-attention the query is [content, spatial] per head, the spatial part being
    the projected conditional spatial query; only the first layer also adds the
    object query's positional projection to the content query and key (`is_first`).
    """

    def __init__(self, d_model, nhead, dim_feedforward, dropout, is_first, attention_impl="auto"):
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
        self.cross_attn = ConditionalCrossAttention(d_model, nhead, dropout, attention_impl)

        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos, spatial_query):
        """
        Args:
            tgt: [num_queries, batch, d_model] decoder embeddings.
            memory, pos: [hw, batch, d_model] encoder output and its positional encoding.
            memory_key_padding_mask: [batch, hw] bool.
            query_pos: [num_queries, batch, d_model] object queries.
            spatial_query: [num_queries, batch, d_model] λq ⊙ sinusoidal(reference points).
        """
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt2 = self.self_attn(q, k, self.sa_v_proj(tgt))
        tgt = self.norm1(tgt + self.dropout1(tgt2))

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

        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))


class ConditionalDecoder(nn.Module):
    """
    Predicts one reference point per object query, then runs the decoder layers,
    each with the spatial query λq ⊙ sinusoidal(reference), λq from `query_scale`
    applied to the layer's input embedding (identity in the first layer).
    """

    def __init__(self, d_model, nhead, num_layers, dim_feedforward, dropout, attention_impl="auto"):
        super().__init__()
        self.layers = nn.ModuleList(
            ConditionalDecoderLayer(d_model, nhead, dim_feedforward, dropout, i == 0, attention_impl)
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, 2, 2)
        self.attention_impl = attention_impl

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos):
        """
        Returns:
            hs: [num_layers, batch, num_queries, d_model], every layer's output after the
                shared final norm.
            reference_points: [batch, num_queries, 2] normalized (x, y).
        """
        reference_points = self.ref_point_head(query_pos).sigmoid()  # [num_queries, batch, 2]
        output = tgt
        intermediate = []
        identity_scale = query_pos.new_ones(()).expand_as(query_pos)
        for layer in self.layers:
            query_scale = identity_scale if layer.is_first else self.query_scale(output)
            spatial_query = ops.conditional_spatial_query(
                reference_points, query_scale, impl=self.attention_impl
            )
            output = layer(output, memory, memory_key_padding_mask, pos, query_pos, spatial_query)
            intermediate.append(self.norm(output))
        return torch.stack(intermediate).transpose(1, 2), reference_points.transpose(0, 1)


class Transformer(nn.Module):
    def __init__(
        self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
        dim_feedforward=2048, dropout=0.1, attention_impl="auto",
    ):
        super().__init__()
        self.encoder = TransformerEncoder(d_model, nhead, num_encoder_layers, dim_feedforward, dropout)
        self.decoder = ConditionalDecoder(
            d_model, nhead, num_decoder_layers, dim_feedforward, dropout, attention_impl
        )
        self.d_model = d_model
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query_embed, pos_embed):
        """
        Args:
            src: [batch, d_model, H, W] projected features.
            mask: [batch, H, W] bool, True at padding.
            query_embed: [num_queries, d_model] object queries.
            pos_embed: [batch, d_model, H, W]
        """
        batch = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)  # [HW, batch, d_model]
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)
        query_pos = query_embed.unsqueeze(1).repeat(1, batch, 1)

        memory = self.encoder(src, mask, pos_embed)
        tgt = torch.zeros_like(query_pos)
        return self.decoder(tgt, memory, mask, pos_embed, query_pos)
