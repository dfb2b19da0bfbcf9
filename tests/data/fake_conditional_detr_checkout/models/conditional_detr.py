"""A tiny model with the official interface: outputs of every decoder layer, a criterion, PostProcess."""
import torch
from torch import nn

from . import backbone


class FrozenBatchNorm2d(nn.Module):
    def __init__(self, n):
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), value))

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]


class MLP(nn.Module):
    def __init__(self, width, depth):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width if i < depth - 1 else 4) for i in range(depth))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else layer(x).relu()
        return x


class ConditionalDETR(nn.Module):
    def __init__(self, num_classes, num_queries, dec_layers, blocks):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), FrozenBatchNorm2d(8), *[nn.Conv2d(8, 8, 1) for _ in range(blocks)])
        self.query_embed = nn.Embedding(num_queries, 8)
        self.class_embed = nn.Linear(8, num_classes)
        self.bbox_embed = MLP(8, 3)
        nn.init.constant_(self.bbox_embed.layers[-1].weight, 0)
        self.dec_layers = dec_layers

    def forward(self, samples):
        feature = self.backbone(samples.tensors)
        mask = nn.functional.interpolate(samples.mask[:, None].float(), size=feature.shape[-2:]).bool()
        feature = feature.masked_fill(mask, 0).mean((2, 3))
        outputs = []
        for layer in range(self.dec_layers):
            hs = self.query_embed.weight[None] * (layer + 1) + feature[:, None]
            outputs.append({"pred_logits": self.class_embed(hs), "pred_boxes": self.bbox_embed(hs).sigmoid()})
        return {**outputs[-1], "aux_outputs": outputs[:-1]}


class SetCriterion(nn.Module):
    def __init__(self, weight_dict):
        super().__init__()
        self.weight_dict = weight_dict

    def forward(self, outputs, targets):
        layers = [*outputs["aux_outputs"], outputs]
        losses = {"class_error": torch.tensor(100.0)}
        for i, out in enumerate(layers):
            suffix = "" if i == len(layers) - 1 else f"_{i}"
            losses["loss_ce" + suffix] = out["pred_logits"].sigmoid().mean()
            losses["loss_bbox" + suffix] = sum((out["pred_boxes"][b, : len(t["boxes"])] - t["boxes"]).abs().mean() for b, t in enumerate(targets))
        return losses


class PostProcess(nn.Module):
    @torch.no_grad()
    def forward(self, outputs, target_sizes):
        prob = outputs["pred_logits"].sigmoid()
        scores, index = prob.flatten(1).topk(100)
        boxes = outputs["pred_boxes"].gather(1, (index // prob.shape[2])[..., None].expand(-1, -1, 4))
        h, w = target_sizes.unbind(1)
        boxes = boxes * torch.stack([w, h, w, h], 1)[:, None]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, index % prob.shape[2], boxes)]


def build(args):
    backbone.is_main_process()  # as the official code asks whether to download ImageNet weights
    blocks = {"resnet18": 1, "resnet50": 2, "resnet101": 3}[args.backbone]
    model = ConditionalDETR(91, args.num_queries, args.dec_layers, blocks)
    weight_dict = {"loss_ce": 2, "loss_bbox": 5}
    weight_dict.update({f"{k}_{i}": v for i in range(args.dec_layers - 1) for k, v in list(weight_dict.items())})
    return model, SetCriterion(weight_dict), {"bbox": PostProcess()}
