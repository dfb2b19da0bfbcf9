"""
The transformer parts DETR and Conditional DETR share: DETR's post-norm encoder, the
encoder-decoder wrapper with the official initialization, and the layer helpers (MLP heads,
feed-forward blocks) every detector of the package uses.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .attention import multihead_attention
from .norms import LayerNorm


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


class Dropout(nn.Dropout):
    """
    nn.Dropout through `ops.dropout`: where the op is compiled, its mask is a hash of a seed
    and each element's index, regenerated in backward instead of being kept.
    """

    ops_impl = "auto"  # the model's MODEL.DETR.OPS_IMPL, set by ops.set_implementation

    def forward(self, x):
        return ops.dropout(x, self.p, self.training, impl=self.ops_impl)


def add_feed_forward_and_norms(layer, d_model, dim_feedforward, dropout, num_residuals):
    """
    The feed-forward block of a post-norm layer and a LayerNorm and Dropout per
    residual branch, under the official names (linear1, linear2, norm1, dropout1, ...).
    """
    layer.linear1 = nn.Linear(d_model, dim_feedforward)
    layer.dropout = Dropout(dropout)
    layer.linear2 = nn.Linear(dim_feedforward, d_model)
    for i in range(1, num_residuals + 1):
        setattr(layer, f"norm{i}", LayerNorm(d_model))
        setattr(layer, f"dropout{i}", Dropout(dropout))


def feed_forward(layer, x):
    return layer.linear2(layer.dropout(F.relu(layer.linear1(x))))


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer; positions are added to queries and keys only."""

    ops_impl = "auto"  # for the attention's dropout, set by ops.set_implementation

    def __init__(self, d_model, nhead, dim_feedforward, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        add_feed_forward_and_norms(self, d_model, dim_feedforward, dropout, num_residuals=2)

    def forward(self, src, key_padding_mask, pos):
        q = k = src + pos
        src2 = multihead_attention(self.self_attn, q, k, src, key_padding_mask, self.ops_impl)
        src = self.norm1(src + self.dropout1(src2))
        return self.norm2(src + self.dropout2(feed_forward(self, src)))


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


class Transformer(nn.Module):
    """
    DETR's encoder followed by a decoder (Conditional DETR's or DETR's), both
    re-initialized as the official code does: xavier on every matrix.
    """

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query_embed, pos_embed, num_groups=1):
        """
        Args:
            src: [batch, d_model, H, W] projected features.
            mask: [batch, H, W] bool, True at padding.
            query_embed: [num_queries, d_model] object queries.
            pos_embed: [batch, d_model, H, W]
            num_groups: the queries' groups, which attend only within themselves.
        Returns a dict: "hs", every decoder layer's output [num_layers, batch, num_queries,
        d_model]; "reference", the reference points [batch, num_queries, 2] (None for DETR);
        and the encoder's output as the multi-level transformers give theirs: "memory" [batch,
        HW, d_model], "memory_padding_mask" [batch, HW], "spatial_shapes" [[H, W]] and
        "level_start_index" [0].
        """
        batch = src.shape[0]
        spatial_shapes = torch._shape_as_tensor(src)[-2:].unsqueeze(0).to(src.device)
        src = src.flatten(2).permute(2, 0, 1)  # [HW, batch, d_model]
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)
        # the same for every image: the decoders project it once and broadcast it over the batch
        query_pos = query_embed.unsqueeze(1)  # [num_queries, 1, d_model]

        memory = self.encoder(src, mask, pos_embed)
        tgt = query_pos.new_zeros(query_pos.shape[0], batch, query_pos.shape[2])
        hs, reference = self.decoder(tgt, memory, mask, pos_embed, query_pos, num_groups)
        return {
            "hs": hs, "reference": reference, "memory": memory.transpose(0, 1), "memory_padding_mask": mask,
            "spatial_shapes": spatial_shapes, "level_start_index": spatial_shapes.new_zeros(1),
        }
