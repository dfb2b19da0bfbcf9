"""
MODEL.BACKBONE.COMPILE_FOR_INFERENCE: in inference the backbone runs compiled by inductor
with its weights frozen into the compiled code (convolutions with prepacked weights, fused
with their bias, ReLU and residual additions). The same outputs; on a 2-core AMD EPYC a
Conditional DETR R50 inference at 800x1216 takes 11% less time (8% with torch held at AVX2;
docs/speed.md), after about 4 s of compilation for each new input size, so it pays where the
sizes repeat (a deployment, a benchmark), not on COCO's varied ones. Training, and inference
with autograd on, run the backbone eagerly. The compiled code holds its own prepacked weights
beside the module's; no other copy is made.
"""
import itertools

import torch
import torch._inductor.config as inductor_config

__all__ = ["FrozenWeightsCompiler"]


class FrozenWeightsCompiler:
    """
    Runs a module eagerly, or, in inference (eval mode, autograd off, not inside a trace or
    another compilation), compiled with frozen weights. Compiled code freezes the weights it
    saw, so it is compiled again whenever they may have changed: a weight changed in place
    (an average of the weights updated between evaluations, a state dict copied in) or
    replaced (a move to another device or dtype), seen from the weights' version counters,
    and whenever the detector calls `forget` (a switch to training, a state dict loaded).
    """

    def __init__(self):
        self.compiled = None
        self.weight_versions = None

    def __call__(self, module, *args):
        inference = not module.training and not torch.is_grad_enabled()
        if not inference or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return module(*args)
        versions = weight_versions(module)
        if self.compiled is None or versions != self.weight_versions:
            # Static shapes: frozen convolutions are prepacked for one input size.
            self.compiled = torch.compile(fresh_caller(module), dynamic=False)
            self.weight_versions = versions
        with inductor_config.patch(freezing=True):
            return self.compiled(*args)

    def forget(self):
        self.compiled = None

    def __deepcopy__(self, memo):
        return FrozenWeightsCompiler()  # a copy's weights are its own

    def __getstate__(self):
        return {"compiled": None, "weight_versions": None}


def fresh_caller(module):
    """
    A function calling `module`, with a code object of its own. torch.compile keeps what it
    compiled per code object (up to 8 versions, then runs eagerly): compiling a new function
    each time the weights change starts from an empty cache, so that code frozen on the old
    weights is never reused, and goes when its function goes.
    """

    def call(*args):
        return module(*args)

    call.__code__ = call.__code__.replace()
    return call


def weights(module):
    return itertools.chain(module.parameters(), module.buffers())


def weight_versions(module):
    """Which tensors the weights are and how often each was changed in place."""
    return tuple((id(t), t._version) for t in weights(module))
