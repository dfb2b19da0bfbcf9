"""
A checkout of an official implementation, imported for a side-by-side comparison: the one
place where the package touches `sys.path` and torch's module names.
"""
import importlib
import os
import sys

import torch

__all__ = ["import_official"]


def _alias_renamed_torch_names():
    # the official attention module's version test takes torch 2 for torch < 1.9 and imports
    # what torch 1.7 and 1.8 renamed: point the old names at the new ones
    linear = torch.nn.modules.linear
    if not hasattr(linear, "_LinearWithBias"):
        linear._LinearWithBias = linear.NonDynamicallyQuantizableLinear
    sys.modules.setdefault("torch._overrides", torch.overrides)


def _forget_other_checkouts(path):
    # the official repositories share top-level names (main, models, util): a module of that
    # name imported from another checkout must not stand in for this one's
    tops = {
        os.path.splitext(entry)[0] for entry in os.listdir(path)
        if entry.endswith(".py") or os.path.isdir(os.path.join(path, entry))
    }
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None) or ""
        if name.split(".")[0] in tops and not os.path.abspath(file).startswith(path + os.sep):
            del sys.modules[name]


def import_official(path, *module_names):
    """
    The modules `module_names` of the checkout at `path` (its top-level packages), in order;
    modules of those packages imported earlier from another checkout are dropped first.
    """
    _alias_renamed_torch_names()
    path = os.path.abspath(path)
    _forget_other_checkouts(path)
    sys.path.insert(0, path)
    try:
        return [importlib.import_module(name) for name in module_names]
    finally:
        sys.path.pop(0)
