"""
The original DETR (Carion et al., ECCV 2020) as the baseline of Conditional DETR:
the same backbone, encoder, heads and set losses, with DETR's decoder.
"""
import torch
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from .detector import SingleLevelDetector
from .attention import multihead_attention, within_groups
from .norms import LayerNorm
from .transformer import add_feed_forward_and_norms, feed_forward


class DETRDecoderLayer(nn.Module):
    """
    DETR's post-norm decoder layer: the object queries are added to the queries and
    keys of the self-attention and to the queries of the standard multi-head
    cross-attention, whose keys are the encoder output plus its positions.
    """

    ops_impl = "auto"  # for the attentions' dropout, set by ops.set_implementation

    def __init__(self, d_model, nhead, dim_feedforward, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        add_feed_forward_and_norms(self, d_model, dim_feedforward, dropout, num_residuals=3)

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos, num_groups=1):
        q = k = tgt + query_pos
        tgt2 = within_groups(
            lambda *qkv: multihead_attention(self.self_attn, *qkv, ops_impl=self.ops_impl), num_groups, q, k, tgt
        )
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = multihead_attention(
            self.multihead_attn, tgt + query_pos, memory + pos, memory, memory_key_padding_mask, self.ops_impl
        )
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        return self.norm3(tgt + self.dropout3(feed_forward(self, tgt)))


class DETRDecoder(nn.Module):
    def __init__(self, d_model, nhead, num_layers, dim_feedforward, dropout):
        super().__init__()
        self.layers = nn.ModuleList(
            DETRDecoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers)
        )
        self.norm = LayerNorm(d_model)

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos, num_groups=1):
        """
        The queries may come in `num_groups` groups that attend only within themselves.
        Returns every layer's output after the shared final norm, [num_layers, batch,
        num_queries, d_model], and None: DETR has no reference points.
        """
        output = tgt
        intermediate = []
        for layer in self.layers:
            output = layer(output, memory, memory_key_padding_mask, pos, query_pos, num_groups)
            intermediate.append(self.norm(output))
        return torch.stack(intermediate).transpose(1, 2), None


@META_ARCH_REGISTRY.register()
class DETR(SingleLevelDetector):
    """
    DETR: learned object queries added to the decoder's queries, a zero initial
    target, boxes sigmoid(FFN(f)) with no reference point. Its recipe (100 queries,
    softmax cross-entropy with a "no object" logit, costs and weights class 1 / L1 5 /
    GIoU 2) is set by configs/Base-DETR.yaml through the MODEL.DETR keys. MODEL.MASK_ON
    adds the paper's mask head (mask_head.py).
    """

    def __init__(self, cfg):
        def build_decoder(args):
            return DETRDecoder(args.HIDDEN_DIM, args.NHEADS, args.DEC_LAYERS, args.DIM_FEEDFORWARD, args.DROPOUT)

        super().__init__(cfg, build_decoder)

    def predict_boxes(self, hs, reference):
        return self.bbox_embed(hs).sigmoid()
