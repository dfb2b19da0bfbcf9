"""
DETR's mask head (Carion et al., ECCV 2020, section 4.4): an attention map of each object
query over the encoder's memory, turned into a mask logit map at stride 4 by a small
FPN-like convolutional head that adds the backbone's res4, res3 and res2 features. Any
detector of the package that gives its last decoder layer's embeddings and a stride-32
memory can carry it, or a stride-16 one (the first upsampling then keeps res4's size);
module and parameter names are the official ones, so that the released panoptic
checkpoints load as they are.
"""
import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, PolygonMasks
from torch import nn

__all__ = ["MASK_FEATURES", "AttentionMap", "MaskHeadSmallConv", "instance_masks"]

# the backbone stages the convolutional head adds, coarsest first
MASK_FEATURES = ("res4", "res3", "res2")


class AttentionMap(nn.Module):
    """
    The attention weights of each query over every position of a feature map, per head,
    without the values: a softmax jointly over the heads and the positions (as the
    official `MHAttentionMap`), padding at -inf. The keys' projection runs as a 1x1
    convolution of the map.
    """

    def __init__(self, query_dim, hidden_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        for linear in (self.q_linear, self.k_linear):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.scale = (hidden_dim / num_heads) ** -0.5

    def forward(self, queries, feature_map, padding_mask=None):
        """
        Args:
            queries: [batch, num_queries, query_dim]
            feature_map: [batch, query_dim, H, W]
            padding_mask: [batch, H, W] bool, True at padding.
        Returns:
            [batch, num_queries, num_heads, H, W] weights summing to 1 over heads and positions.
        """
        batch, num_queries = queries.shape[:2]
        height, width = feature_map.shape[-2:]
        q = self.q_linear(queries) * self.scale
        k = F.conv2d(feature_map, self.k_linear.weight[..., None, None], self.k_linear.bias)
        q = q.view(batch, num_queries, self.num_heads, -1)
        k = k.view(batch, self.num_heads, -1, height, width)
        weights = torch.einsum("bqnc,bnchw->bqnhw", q, k)
        if padding_mask is not None:
            weights = weights.masked_fill(padding_mask[:, None, None], float("-inf"))
        return weights.flatten(2).softmax(-1).view(weights.shape)


class MaskHeadSmallConv(nn.Module):
    """
    The official convolutional mask head: the stride-32 projected features of an image
    concatenated with one query's attention maps, five 3x3 convolutions with GroupNorm(8)
    and ReLU, each of the last three after a nearest upsampling and the sum with a 1x1
    adapter of the next finer backbone stage (res4, res3, res2), then a 3x3 convolution to
    one mask logit per stride-4 pixel. It runs for any queries of the batch, each with its
    image's index: training asks for the matched ones only. Each image's adapters are
    computed once and shared by its queries, which the official code repeats per query.
    """

    def __init__(self, dim, fpn_dims, context_dim):
        super().__init__()
        widths = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        for i in range(5):
            setattr(self, f"lay{i + 1}", nn.Conv2d(widths[i - 1] if i else dim, widths[i], 3, padding=1))
            setattr(self, f"gn{i + 1}", nn.GroupNorm(8, widths[i]))
        self.out_lay = nn.Conv2d(widths[4], 1, 3, padding=1)
        for i, fpn_dim in enumerate(fpn_dims):
            setattr(self, f"adapter{i + 1}", nn.Conv2d(fpn_dim, widths[i + 1], 1))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, features, attention_maps, fpn_features, batch_index):
        """
        Args:
            features: [batch, C, H, W] the projected features of the memory (stride 32 or 16).
            attention_maps: [N, num_heads, H, W] those of N queries of the batch's images.
            fpn_features: the res4, res3 and res2 features, [batch, C_i, H_i, W_i] each.
            batch_index: [N] the image of each query.
        Returns:
            [N, H_2, W_2] mask logits at the size of res2.
        """
        x = torch.cat([features[batch_index], attention_maps], 1)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        for i, fpn in enumerate(fpn_features):
            adapted = getattr(self, f"adapter{i + 1}")(fpn)  # once per image, shared by its queries
            x = adapted[batch_index] + F.interpolate(x, size=adapted.shape[-2:], mode="nearest")
            x = F.relu(getattr(self, f"gn{i + 3}")(getattr(self, f"lay{i + 3}")(x)))
        return self.out_lay(x)[:, 0]


def instance_masks(instances, height, width):
    """The `gt_masks` of detectron2 `instances` (polygons or bit masks) as [n, height, width] bool."""
    masks = instances.gt_masks
    if isinstance(masks, PolygonMasks):
        masks = BitMasks.from_polygon_masks(masks, height, width)
    return masks.tensor.to(torch.bool)
