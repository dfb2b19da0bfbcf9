"""
FLOPs and parameters of a Conditional DETR, DETR or Deformable DETR model, counted by
fvcore as detectron2's tools/analyze_model.py counts them.

    python -m conditional_detr.tools.analyze_model --config-file FILE --tasks flop parameter
        [--input-size H W | --num-inputs N] [--json PATH] [KEY VALUE ...]

FLOPs are counted on one synthetic image of --input-size (default 800x1216) or averaged
over the first --num-inputs images of DATASETS.TEST[0] as the test loader feeds them.
They do not depend on the weights: the model is randomly initialized unless
MODEL.WEIGHTS is given on the command line.

As fvcore counts: one FLOP per multiply-add of convolutions, linear layers, matrix
products and normalizations; elementwise ops (add, mul, softmax, sigmoid, the sine
embeddings) are not counted. The reported "gflops" follow the official implementation's
counts (see `count_flops`); "gflops_with_masked_attention_logits" counts every matrix
product. Deformable attention, which fvcore does not know, is counted as its multiply-adds
(see `deformable_attention_flops`).
"""

import argparse
import json
import logging
import os
from collections import Counter

import numpy as np
import torch

from detectron2.utils.analysis import FlopCountAnalysis
from detectron2.utils.logger import setup_logger
from fvcore.nn import flop_count_table, parameter_count_table
from fvcore.nn.jit_handles import get_shape

from .. import ops
from ..engine import Trainer, get_config
from .inference import build_eval_model

logger = logging.getLogger("detectron2")

TASKS = ("flop", "parameter")


def _attention_flops(inputs, outputs):
    """
    aten::scaled_dot_product_attention: query [..., Lq, E], key [..., Lk, E], value
    [..., Lk, Ev], attn_mask. The logits of a masked call are reported on their own as
    "masked_attention_logits", which the official counts leave out (see `count_flops`).
    """
    *batch, num_queries, channels = get_shape(inputs[0])
    num_keys = get_shape(inputs[1])[-2]
    value_channels = get_shape(inputs[2])[-1]
    pairs = int(np.prod(batch)) * num_queries * num_keys
    masked = get_shape(inputs[3]) is not None
    logits = "masked_attention_logits" if masked else "attention_logits"
    return Counter({logits: pairs * channels, "attention_values": pairs * value_channels})


def _no_flops(inputs, outputs):
    return 0


# per sampled value: 4 multiply-adds of bilinear interpolation, 1 of the attention weight
DEFORMABLE_FLOPS_PER_SAMPLE = 5


def deformable_attention_flops(inputs, outputs):
    """
    conditional_detr::multi_scale_deformable_attention: value [N, S, heads, C], ...,
    sampling_locations [N, Lq, heads, levels, points, 2]: every sampled channel is
    interpolated from 4 neighbours and weighted once.
    """
    channels = get_shape(inputs[0])[-1]
    samples = int(np.prod(get_shape(inputs[3])[:-1]))
    return Counter({"deformable_attention": samples * channels * DEFORMABLE_FLOPS_PER_SAMPLE})


def grid_sampler_flops(inputs, outputs):
    """
    aten::grid_sampler as the PyTorch deformable attention calls it, output [N * heads, C,
    Lq, points]: counted as `deformable_attention_flops`, the weighting of each sample
    (an elementwise product fvcore leaves out) included, so that both implementations agree.
    """
    samples = int(np.prod(get_shape(outputs[0])))
    return Counter({"deformable_attention": samples * DEFORMABLE_FLOPS_PER_SAMPLE})


def flop_analysis(model, inputs):
    """
    fvcore's FlopCountAnalysis of `model` on `inputs` (a list of detectron2 input dicts),
    with handles for the ops fvcore does not know: the project's compiled attention ops
    (counted as their PyTorch reference), scaled_dot_product_attention (both products) and
    deformable attention (compiled or grid_sample).
    """
    analysis = FlopCountAnalysis(model, inputs)
    # Frozen BatchNorm folds into the convolution before it; the official backbone
    # computes it as x * scale + bias, elementwise ops fvcore does not count.
    # (detectron2's wrapper means to ignore batch_norm, but fvcore's own handle wins.)
    analysis.set_op_handle("aten::batch_norm", _no_flops)
    analysis.set_op_handle("aten::scaled_dot_product_attention", _attention_flops)
    analysis.set_op_handle(**ops.fvcore_handles())
    analysis.set_op_handle("aten::grid_sampler", grid_sampler_flops)
    analysis.set_op_handle("conditional_detr::multi_scale_deformable_attention", deformable_attention_flops)
    return analysis


def count_flops(model, inputs):
    """
    (official-comparable FLOPs, all FLOPs, per-operator Counter, the fvcore analysis) on
    one batch of inputs.

    The official counts leave out the logits Q.K^T of attention with a padding mask: the
    official encoder (and DETR's cross-attention) is torch's nn.MultiheadAttention, called
    with the mask and need_weights=True, and since torch 1.12 it computes masked logits
    with baddbmm(mask, q, k^T), for which fvcore has no handle; its weights . V (bmm), the
    official conditional decoder's attention (its own bmm) and every linear layer are
    counted. Here those are the masked scaled_dot_product_attention calls (the encoder's).
    fvcore on the official model at 800x1216 gives 94.8 (R50) and 187.9 (DC5-R50) GFLOPs;
    the counts here without these logits give 94.79 and 187.93, with them 96.2 and 210.1
    (the DC5 encoder has 3,800 tokens: 22 GFLOPs of logits).
    """
    with torch.no_grad():
        analysis = flop_analysis(model, inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = analysis.total()
        by_operator = analysis.by_operator()
        return total - by_operator.get("masked_attention_logits", 0), total, by_operator, analysis


def synthetic_inputs(height, width):
    # FLOPs depend on the size only; the image is used as it is, not resized.
    return [{"image": torch.zeros(3, height, width)}]


def dataset_inputs(cfg, num_inputs):
    """The first `num_inputs` batches of the test loader of DATASETS.TEST[0]."""
    if not cfg.DATASETS.TEST:
        raise ValueError("--num-inputs needs a dataset in DATASETS.TEST, the config has none")
    loader = Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
    batches = []
    for batch in loader:
        if len(batches) == num_inputs:
            break
        batches.append(batch)
    return batches


def analyze_flops(cfg, model, input_size=None, num_inputs=None):
    """Mean official-comparable and complete GFLOPs over the inputs, and per-operator GFLOPs."""
    batches = dataset_inputs(cfg, num_inputs) if num_inputs else [synthetic_inputs(*input_size)]
    official, complete, by_operator = [], [], Counter()
    for i, inputs in enumerate(batches):
        flops, all_flops, operators, analysis = count_flops(model, inputs)
        if i == 0:
            logger.info("FLOPs of the first input, per module:\n" + flop_count_table(analysis, 4))
        official.append(flops)
        complete.append(all_flops)
        by_operator.update(operators)
    return {
        "gflops": float(np.mean(official)) / 1e9,
        "gflops_std": float(np.std(official)) / 1e9,
        "gflops_with_masked_attention_logits": float(np.mean(complete)) / 1e9,
        "gflops_by_operator": {k: v / len(batches) / 1e9 for k, v in by_operator.items()},
        "num_inputs": len(batches),
    }


def count_parameters(model):
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    inputs = parser.add_mutually_exclusive_group()
    inputs.add_argument(
        "--input-size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="size of the synthetic input (default 800 1216)",
    )
    inputs.add_argument(
        "--num-inputs", type=int, help="average over this many images of DATASETS.TEST[0]"
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument(
        "opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    args = parser.parse_args(argv)
    if args.input_size is None:
        args.input_size = [800, 1216]
    if min(args.input_size) <= 0:
        parser.error(f"--input-size must be positive, got {args.input_size}")
    if args.num_inputs is not None and args.num_inputs <= 0:
        parser.error(f"--num-inputs must be positive, got {args.num_inputs}")
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = get_config(args.config_file, args.opts)
    cfg.freeze()
    if not logger.handlers:
        setup_logger(name="detectron2")
    # The config's own MODEL.WEIGHTS is usually an ImageNet backbone for training: only
    # weights given on the command line are loaded, and the counts do not depend on them.
    model = build_eval_model(cfg, load_weights="MODEL.WEIGHTS" in args.opts[::2])

    results = {"config_file": os.path.abspath(args.config_file)}
    if "flop" in args.tasks:
        results.update(analyze_flops(cfg, model, args.input_size, args.num_inputs))
        where = (
            f"the first {results['num_inputs']} images of {cfg.DATASETS.TEST[0]}"
            if args.num_inputs
            else "a {}x{} input".format(*args.input_size)
        )
        if args.num_inputs:
            results["dataset"] = cfg.DATASETS.TEST[0]
        else:
            results["input_size"] = list(args.input_size)
        spread = f" ± {results['gflops_std']:.1f}" if args.num_inputs else ""
        print(f"GFLOPs on {where}: {results['gflops']:.1f}{spread}")
        print(
            "  with the logits of masked attention (left out of the official counts): "
            f"{results['gflops_with_masked_attention_logits']:.1f}"
        )
        for name, value in sorted(results["gflops_by_operator"].items(), key=lambda kv: -kv[1]):
            print(f"  {name}: {value:.3f}")
    if "parameter" in args.tasks:
        results.update(count_parameters(model))
        logger.info("Parameters:\n" + parameter_count_table(model, max_depth=3))
        print(f"Parameters: {results['params']:,} ({results['trainable_params']:,} trainable)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
