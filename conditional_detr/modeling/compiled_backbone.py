"""
MODEL.BACKBONE.COMPILE_FOR_INFERENCE: in inference the backbone runs compiled by inductor
with its weights frozen into the compiled code (convolutions with prepacked weights, fused
with their bias, ReLU and residual additions). The same outputs; on a 2-core AMD EPYC a
Conditional DETR R50 inference at 800x1216 takes 11% less time (8% with torch held at AVX2;
docs/speed.md), after about 4 s of compilation for each new input size, so it pays where the
sizes repeat (a deployment, a benchmark), not on COCO's varied ones. Training, and inference
with autograd on, run the backbone eagerly.
"""
import copy

import torch
import torch._inductor.config as inductor_config

__all__ = ["FrozenWeightsCompiler"]


class FrozenWeightsCompiler:
    """
    Runs a module eagerly, or, in inference (eval mode, autograd off, not inside a trace or
    another compilation), compiled with frozen weights: a copy of the module at its first
    inference, compiled. `forget` drops the copy, and the detector calls it whenever its
    weights may change (a switch to training, a state dict loaded, a move to another device
    or dtype); the next inference copies and compiles the new weights.
    """

    def __init__(self):
        self.compiled = None

    def __call__(self, module, *args):
        inference = not module.training and not torch.is_grad_enabled()
        if not inference or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return module(*args)
        if self.compiled is None:
            # a snapshot of the weights: compiled code is cached by the module's parameter
            # objects, and weights changed in place would reuse code frozen on the old values.
            # Static shapes: frozen convolutions are prepacked for one input size.
            self.compiled = torch.compile(copy.deepcopy(module), dynamic=False)
        with inductor_config.patch(freezing=True):
            return self.compiled(*args)

    def forget(self):
        self.compiled = None

    def __deepcopy__(self, memo):
        return FrozenWeightsCompiler()  # a copy's weights are its own

    def __getstate__(self):
        return {"compiled": None}
