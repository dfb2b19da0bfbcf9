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


def import_official(path, *module_names):
    """The modules `module_names` of the checkout at `path` (its top-level packages), in order."""
    _alias_renamed_torch_names()
    sys.path.insert(0, os.path.abspath(path))
    try:
        return [importlib.import_module(name) for name in module_names]
    finally:
        sys.path.pop(0)
