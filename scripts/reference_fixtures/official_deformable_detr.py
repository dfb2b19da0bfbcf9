"""
The fixtures of fundamentalvision/Deformable-DETR: three small models (plain, box refinement,
two-stage) with their outputs and internals, one case of the attention core in float64, and
the keys of the three full-size models.

The official attention runs a compiled CUDA op; here every MSDeformAttn calls the official
pure-PyTorch core `ms_deform_attn_core_pytorch` instead (never this project's op: the check
would become circular). The official backbone hard-codes ResNet-50's C3-C5 channels: for
ResNet-18 only those numbers change, to 128/256/512.
"""
import re
import sys
import types

import torch
import torchvision

from conditional_detr.tools.official_checkout import import_official

from .common import (
    FOCAL_PRIOR_BIAS, SEED, TINY_OPTIONS, Checkout, detached, image_sizes, normal, random_images,
    random_targets, randomize_frozen_batch_norm, round_to_float16, weighted_terms, write_args,
    write_keys,
)

MARKER = "models/deformable_detr.py"
FILES = (
    "official_deformable_r18_tiny.pth", "official_deformable_r18_tiny_args.json",
    "official_deformable_r18_tiny_io.pth", "official_msdeform_attn_op.pth",
    "official_deformable_r50_keys.txt", "official_deformable_r50_refine_keys.txt",
    "official_deformable_r50_two_stage_keys.txt",
)
VARIANTS = {"plain": [], "refine": ["--with_box_refine"], "two_stage": ["--with_box_refine", "--two_stage"]}
KEY_FILES = {
    "plain": "official_deformable_r50_keys.txt",
    "refine": "official_deformable_r50_refine_keys.txt",
    "two_stage": "official_deformable_r50_two_stage_keys.txt",
}
# what the three small models share (the heads, queries and two-stage layers differ)
SHARED = re.compile(r"^(backbone\.|input_proj\.|transformer\.level_embed$|transformer\.encoder\.|transformer\.decoder\.layers\.)")


def make(path, progress):
    checkout = deformable_checkout(path)
    tiny(checkout, progress)
    attention_core_case(checkout, progress)
    for variant, options in VARIANTS.items():
        torch.manual_seed(SEED)
        model = checkout.build(options + ["--device", "cpu"])[0]
        write_keys(progress.path(KEY_FILES[variant]), model.state_dict())
        progress.wrote(KEY_FILES[variant])


def deformable_checkout(path):
    # the compiled op's module is never built: a stand-in lets the official code import
    sys.modules.setdefault("MultiScaleDeformableAttention", types.ModuleType("MultiScaleDeformableAttention"))
    # util/misc.py reads the version's first three characters, "0.2" for 0.29, as older than
    # 0.5 and imports what torchvision 0.5 had: while it imports, the version reads as 0.9
    version = torchvision.__version__
    torchvision.__version__ = "0.9"
    try:
        checkout = Checkout(path)
    finally:
        torchvision.__version__ = version
    functions, attention = import_official(path, "models.ops.functions.ms_deform_attn_func", "models.ops.modules.ms_deform_attn")
    checkout.attention_core = functions.ms_deform_attn_core_pytorch

    class OfficialCore:
        @staticmethod
        def apply(value, shapes, level_start_index, locations, weights, im2col_step):
            return functions.ms_deform_attn_core_pytorch(value, shapes, locations, weights)

    attention.MSDeformAttnFunction = OfficialCore
    allow_basic_block_resnets(checkout.backbone)
    return checkout


def allow_basic_block_resnets(backbone):
    """The official Backbone, with ResNet-18/34's C3-C5 channels instead of its assertion."""
    official_init = backbone.Backbone.__init__

    def init(self, name, train_backbone, return_interm_layers, dilation):
        if name not in ("resnet18", "resnet34"):
            return official_init(self, name, train_backbone, return_interm_layers, dilation)
        resnet = getattr(torchvision.models, name)(
            replace_stride_with_dilation=[False, False, dilation], norm_layer=backbone.FrozenBatchNorm2d
        )
        backbone.BackboneBase.__init__(self, resnet, train_backbone, return_interm_layers)
        self.num_channels = [128, 256, 512][-len(self.num_channels):]
        if dilation:
            self.strides[-1] = self.strides[-1] // 2

    backbone.Backbone.__init__ = init


def tiny(checkout, progress):
    built, states, arguments = {}, {}, {}  # by variant: (model, criterion, postprocessors), float16 state, args
    for variant, options in VARIANTS.items():
        torch.manual_seed(SEED)
        model, criterion, postprocessors, args = checkout.build(TINY_OPTIONS + ["--num_queries", "30"] + options)
        randomize(model, torch.Generator().manual_seed(SEED))
        if variant != "plain":  # the parts every variant has hold the same values, stored once
            plain = built["plain"][0].state_dict()
            model.load_state_dict({k: plain[k] if SHARED.match(k) else v for k, v in model.state_dict().items()})
        states[variant] = round_to_float16(model)
        if variant != "plain":
            states[variant] = {k: states["plain"][k] if SHARED.match(k) else v for k, v in states[variant].items()}
        built[variant], arguments[variant] = (model, criterion, postprocessors), vars(args)

    generator = torch.Generator().manual_seed(SEED)
    images = random_images([(301, 457), (389, 318)], generator)
    targets = random_targets([[1, 18, 90], [3, 62]], generator)
    io_ = {
        "images_uint8_rgb": images, "target_sizes": image_sizes(images), "targets_coco_ids": targets,
        **{variant: variant_io(checkout, *parts, images, targets) for variant, parts in built.items()},
    }
    torch.save({variant: {"model": state} for variant, state in states.items()}, progress.path("official_deformable_r18_tiny.pth"))
    write_args(progress.path("official_deformable_r18_tiny_args.json"), arguments)
    torch.save(io_, progress.path("official_deformable_r18_tiny_io.pth"))
    progress.wrote("official_deformable_r18_tiny.pth", "official_deformable_r18_tiny_args.json",
                   "official_deformable_r18_tiny_io.pth")


@torch.no_grad()
def randomize(model, generator):
    """
    The official zero and constant initializations replaced, so that errors show (the
    reference README lists the distributions); shared modules are drawn once.
    """
    randomize_frozen_batch_norm(model, generator)
    for name, p in model.named_parameters():
        head = re.search(r"(^|\.)(class_embed|bbox_embed)\.\d+\.(.*)$", name)
        if "sampling_offsets" in name:
            if name.endswith("weight"):
                p.copy_(normal(p.shape, 0.03, generator))
            else:
                p.add_(normal(p.shape, 0.25, generator))  # the official grid, jittered
        elif "attention_weights" in name:
            p.copy_(normal(p.shape, 0.05 if name.endswith("weight") else 0.5, generator))
        elif head and head.group(2) == "class_embed" and head.group(3) == "bias":
            p.copy_(FOCAL_PRIOR_BIAS + normal(p.shape, 1.0, generator))
        elif head and head.group(3) == "layers.2.weight":
            p.copy_(normal(p.shape, 0.05, generator))
        elif head and head.group(3) == "layers.2.bias":
            p.add_(normal(p.shape, 0.2, generator))
        elif head:
            p.add_(normal(p.shape, 0.02, generator))  # the refine heads start as identical copies
        elif not name.startswith("backbone.") and p.numel() > 1 and bool((p == p.flatten()[0]).all()):
            p.add_(normal(p.shape, 0.05 if name.endswith("bias") else 0.1, generator))


def variant_io(checkout, model, criterion, postprocessors, images, targets):
    """One variant's eval outputs, internals, post-processing, and losses in train mode."""
    internals = {}
    hooks = [
        model.transformer.encoder.register_forward_pre_hook(
            lambda module, args: internals.update(spatial_shapes=args[1], level_start_index=args[2], valid_ratios=args[3])
        ),
        model.transformer.register_forward_hook(
            lambda module, args, out: internals.update(init_reference=out[1], inter_references=out[2])
        ),
    ]
    with torch.no_grad():
        model.eval()
        outputs = detached(model(checkout.samples(images)))
        transformer = detached(internals)
        model.train()
        train_outputs = detached(model(checkout.samples(images)))
        losses = criterion(train_outputs, targets)
    for hook in hooks:
        hook.remove()
    model.eval()
    result = {
        "pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"], "aux_outputs": outputs["aux_outputs"],
        "postprocess": postprocessors["bbox"](outputs, image_sizes(images)),
        "losses": weighted_terms(criterion, losses),
        "log_terms": {k: v.item() for k, v in losses.items() if k not in criterion.weight_dict},
        "weight_dict": dict(criterion.weight_dict),
        "train_equals_eval": all_equal(outputs, train_outputs),
        "transformer": transformer,
    }
    if "enc_outputs" in outputs:
        result["enc_outputs"] = outputs["enc_outputs"]
    return result


def all_equal(a, b):
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(all_equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(all_equal(x, y) for x, y in zip(a, b))


def attention_core_case(checkout, progress):
    """The official core in float64 on locations about half outside [0, 1], with gradients."""
    generator = torch.Generator().manual_seed(SEED)
    shapes = torch.tensor([[7, 9], [5, 3], [3, 5], [1, 3]])
    areas = shapes.prod(1)
    case = {
        "value": torch.randn(2, int(areas.sum()), 2, 4, generator=generator, dtype=torch.float64),
        "spatial_shapes": shapes,
        "level_start_index": torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]),
        "sampling_locations": -0.2 + 1.4 * torch.rand(2, 5, 2, 4, 3, 2, generator=generator, dtype=torch.float64),
        "attention_logits": torch.randn(2, 5, 2, 12, generator=generator, dtype=torch.float64),
    }
    case["attention_weights"] = case["attention_logits"].softmax(-1).view(2, 5, 2, 4, 3)
    leaves = [case[k].clone().requires_grad_(True) for k in ("value", "sampling_locations", "attention_weights")]
    output = checkout.attention_core(leaves[0], shapes, leaves[1], leaves[2])
    case["output"] = output.detach()
    case["grad_projection"] = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad((output * case["grad_projection"]).sum(), leaves)
    for name, grad in zip(("grad_value", "grad_sampling_locations", "grad_attention_weights"), grads):
        case[name] = grad
    torch.save(case, progress.path("official_msdeform_attn_op.pth"))
    progress.wrote("official_msdeform_attn_op.pth")

