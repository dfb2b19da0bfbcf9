"""
What the formats of other implementations share: their modules are the official ones under
other names, renamed by an ordered table of (pattern, replacement) to the official layout,
which `official.convert_state_dict` then brings to this project's (backbone, class rows).
"""
import re

from .class_heads import coco_class_names

__all__ = ["ForeignFormat", "rename_keys"]


def rename_keys(state_dict, renames, source, architecture, lacking="this project's"):
    """
    `state_dict` with each key renamed by the first (pattern, replacement) of `renames` that
    matches. A key none matches is a module the destination's model (`lacking`) lacks (a
    normalized neck, another head...), so a ValueError names it: loading the rest would
    compute something else.
    """
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in renames:
            new_key, count = re.subn(pattern, replacement, key)
            if count:
                renamed[new_key] = value
                break
        else:
            raise ValueError(
                f"{source}'s {architecture} here has {key!r}, a part {lacking} {architecture} does not "
                "have; it cannot load this checkpoint"
            )
    return renamed


class ForeignFormat:
    """
    One detector of another implementation: the interface of the formats of `formats.py`
    (`name`, `architecture`, `recognizes`, `check_meta`, `convert`, `class_names`). Its state
    dicts hold every one of `markers`; subclasses convert them and check their metadata.
    """

    repository = ""  # where the implementation lives
    source = ""  # how errors call it

    def __init__(self, name, architecture, markers, renames):
        self.name, self.architecture, self._markers, self._renames = name, architecture, markers, renames

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"

    def recognizes(self, state_dict):
        return all(marker in state_dict for marker in self._markers)

    def rename(self, state_dict):
        return rename_keys(state_dict, self._renames, self.source, self.architecture)

    class_names = staticmethod(coco_class_names)
