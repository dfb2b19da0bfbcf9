"""
Draw the decoder's cross-attention of chosen predictions over the image, as the paper's
Figures 1 and 4: for every head, the softmax of the spatial dot-products q_p . k_p alone,
of the content dot-products q_c . k_c alone, and of their sum, the attention the model uses.

    python -m conditional_detr.tools.visualize_attention --config-file FILE --input IMG
        --output DIR [--query K | --top N] [--layer L] MODEL.WEIGHTS W

One PNG per prediction, DIR/<image>_query<K>_layer<L>.png (rows: heads; columns: spatial,
content, combined), with the box that layer predicts for the query; the top N are the
queries whose best class scores highest in the last layer. DIR/<image>_attention.json
lists the predictions drawn.
"""

import argparse
import contextlib
import inspect
import json
import logging
import os

import torch
import torch.nn.functional as F

from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger

from ..engine import get_config
from ..modeling.attention import ConditionalCrossAttention
from ..modeling.box_ops import box_cxcywh_to_xyxy
from .inference import build_eval_model, list_images, model_input, read_image, to_rgb

logger = logging.getLogger("detectron2")

MAP_KINDS = ("spatial", "content", "combined")


@contextlib.contextmanager
def capture_cross_attention(model):
    """
    Record the inputs of every ConditionalCrossAttention call (q_content, q_spatial,
    k_content, k_spatial, value, key_padding_mask, by name, and its `nhead`) in a list, one
    entry per decoder layer in call order, and the size of the feature map the keys
    are flattened from, under "feature_size" of the yielded dict.
    """
    captured = {"layers": [], "feature_size": None}

    def record_inputs(module, args, kwargs, output):
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        captured["layers"].append({**bound.arguments, "num_heads": module.nhead})

    def record_feature_size(module, args, output):
        captured["feature_size"] = tuple(output.shape[-2:])

    handles = [model.input_proj.register_forward_hook(record_feature_size)]
    for module in model.modules():
        if isinstance(module, ConditionalCrossAttention):
            handles.append(module.register_forward_hook(record_inputs, with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def attention_maps(inputs):
    """
    The per-head attention weights of one captured cross-attention call, as the model
    computes them (`ops.reference.conditional_cross_attention`): logits scaled by
    1 / sqrt(2 * head_dim), the head dimension of the concatenated [content, spatial]
    query, and -inf at padded keys (mask True) before the softmax over keys.

    Returns:
        {"spatial" | "content" | "combined": [batch, heads, num_queries, num_keys]}
    """
    num_heads = inputs["num_heads"]
    num_queries, batch, dim = inputs["q_content"].shape
    head_dim = dim // num_heads
    scale = (2 * head_dim) ** -0.5

    def heads(x):  # [length, batch, heads * head_dim] -> [length, batch, heads, head_dim]
        return x.reshape(x.shape[0], batch, num_heads, head_dim).float()

    def products(q, k):
        return torch.einsum("qbhc,kbhc->bhqk", heads(q), heads(k)) * scale

    content = products(inputs["q_content"], inputs["k_content"])
    spatial = products(inputs["q_spatial"], inputs["k_spatial"])
    logits = {"spatial": spatial, "content": content, "combined": content + spatial}
    mask = inputs["key_padding_mask"]
    maps = {}
    for kind, value in logits.items():
        if mask is not None:
            value = value.masked_fill(mask[:, None, None, :], float("-inf"))
        # a fully padded key row attends to nothing, as in the model
        maps[kind] = torch.nan_to_num(value.softmax(dim=-1), nan=0.0)
    return maps


def unpadded_grid(weights, key_padding_mask, feature_size):
    """
    [..., num_keys] weights of one image -> [..., h, w] on the feature map, cropped to the
    image's unpadded region (mask: [num_keys] bool, True at padding).
    """
    height, width = feature_size
    grid = weights.reshape(*weights.shape[:-1], height, width)
    if key_padding_mask is None:
        return grid
    valid = ~key_padding_mask.reshape(height, width)
    return grid[..., : int(valid[:, 0].sum()), : int(valid[0].sum())]


def resolve_layer(layer, num_layers):
    if not -num_layers <= layer < num_layers:
        raise ValueError(
            f"--layer {layer} is out of range: the model has {num_layers} decoder layers "
            f"(0..{num_layers - 1}, or negative from the last)"
        )
    return layer % num_layers


def choose_queries(scores, query=None, top=None):
    """Query indices: `query` itself, or the `top` highest of `scores` [num_queries]."""
    num_queries = len(scores)
    if query is not None:
        if not 0 <= query < num_queries:
            raise ValueError(
                f"--query {query} is out of range: the model has {num_queries} object queries "
                f"(0..{num_queries - 1})"
            )
        return [query]
    return scores.argsort(descending=True)[: min(top, num_queries)].tolist()


def class_scores(model, logits):
    """(best score, its class) per query of `logits` [num_queries, num_class_logits]."""
    if getattr(model, "class_loss", "focal") == "softmax":
        return logits.softmax(-1)[:, :-1].max(-1)  # "no object" left out
    return logits.sigmoid().max(-1)


def run_with_attention(cfg, model, image):
    """
    Run the model on one image (INPUT.FORMAT, HWC uint8). Returns its output dict
    (`forward_outputs`), the captured cross-attention inputs of every decoder layer, and
    the feature map size.
    """
    images = model.preprocess_image([model_input(cfg, image)])
    with torch.no_grad(), capture_cross_attention(model) as captured:
        outputs = model.forward_outputs(images)
    if not captured["layers"]:
        raise ValueError(
            f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r} has no conditional "
            "cross-attention to draw"
        )
    return outputs, captured["layers"], captured["feature_size"]


def draw_attention(path, image_rgb, grids, box, title):
    """
    A figure with one row per head and one column per kind of map, each map upsampled
    to the image and drawn over it with the box (XYXY pixels).
    """
    # a Figure of its own, not pyplot: no GUI backend, no global state
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    height, width = image_rgb.shape[:2]
    num_heads = grids["combined"].shape[0]
    panel = 3.0
    figure = Figure(
        figsize=(panel * len(MAP_KINDS), panel * height / width * num_heads + 0.6),
        layout="constrained",
    )
    axes = figure.subplots(num_heads, len(MAP_KINDS), squeeze=False)
    for kind_index, kind in enumerate(MAP_KINDS):
        upsampled = F.interpolate(grids[kind][:, None], size=(height, width), mode="bilinear")
        for head in range(num_heads):
            axis = axes[head, kind_index]
            axis.imshow(image_rgb)
            axis.imshow(upsampled[head, 0].numpy(), cmap="jet", alpha=0.5)
            x0, y0, x1, y1 = box
            axis.add_patch(
                Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.5)
            )
            axis.set_xticks([]), axis.set_yticks([])
            if head == 0:
                axis.set_title(kind)
            if kind_index == 0:
                axis.set_ylabel(f"head {head}")
    figure.suptitle(title)
    figure.savefig(path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--input", required=True, metavar="IMG", help="an image file")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the figures")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--query", type=int, help="the object query to draw")
    chosen.add_argument("--top", type=int, default=1, help="draw the N highest-scoring queries")
    parser.add_argument(
        "--layer", type=int, default=-1, help="decoder layer, from 0 (default: the last)"
    )
    parser.add_argument(
        "opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    args = parser.parse_args(argv)
    if args.top <= 0:
        parser.error(f"--top must be positive, got {args.top}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if os.path.isdir(args.input):
        raise ValueError(f"--input must be an image file, {args.input!r} is a folder")
    (path,) = list_images([args.input])
    cfg = get_config(args.config_file, args.opts)
    cfg.freeze()
    if not logger.handlers:
        setup_logger(name="detectron2")
    if not cfg.MODEL.WEIGHTS:
        logger.warning(
            "MODEL.WEIGHTS is empty: drawing the attention of a randomly initialized model"
        )
    model = build_eval_model(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
    class_names = metadata.get("thing_classes", None) if metadata else None

    image = read_image(path, cfg.INPUT.FORMAT)
    height, width = image.shape[:2]
    outputs, layers, feature_size = run_with_attention(cfg, model, image)
    layer = resolve_layer(args.layer, len(layers))
    final_scores, _ = class_scores(model, outputs["pred_logits"][0])
    queries = choose_queries(final_scores, args.query, args.top)

    layer_outputs = outputs["aux_outputs"] + [outputs]
    scores, labels = class_scores(model, layer_outputs[layer]["pred_logits"][0])
    boxes = box_cxcywh_to_xyxy(layer_outputs[layer]["pred_boxes"][0])
    boxes = boxes * torch.tensor([width, height, width, height], dtype=boxes.dtype)

    inputs = layers[layer]
    maps = attention_maps(inputs)
    mask = inputs["key_padding_mask"]
    mask = mask[0] if mask is not None else None
    image_rgb = to_rgb(image, cfg.INPUT.FORMAT)
    stem = os.path.splitext(os.path.basename(path))[0]
    os.makedirs(args.output, exist_ok=True)
    drawn = []
    for query in queries:
        grids = {kind: unpadded_grid(maps[kind][0, :, query], mask, feature_size) for kind in maps}
        label = int(labels[query])
        name = class_names[label] if class_names else str(label)
        score = float(scores[query])
        figure_path = os.path.join(args.output, f"{stem}_query{query}_layer{layer}.png")
        box = boxes[query].tolist()
        draw_attention(
            figure_path,
            image_rgb,
            grids,
            box,
            f"{stem}: query {query}, decoder layer {layer}, {name} {score:.2f}",
        )
        drawn.append(
            {
                "query": query,
                "layer": layer,
                "class": name,
                "score": score,
                "box": box,
                "figure": os.path.abspath(figure_path),
            }
        )
        logger.info(f"query {query} ({name} {score:.2f}) -> {figure_path}")
    with open(os.path.join(args.output, f"{stem}_attention.json"), "w") as f:
        json.dump(drawn, f, indent=2)
    return drawn


if __name__ == "__main__":
    main()
