"""
What the formats of other implementations share: their modules are the official ones under
other names, renamed by an ordered table of (pattern, replacement) to the official layout,
which `official.convert_state_dict` then brings to this project's (backbone, class rows).
"""
import re

from .class_heads import coco_class_names

__all__ = ["ForeignFormat", "rename_keys", "template_renames"]


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


_FIELD = re.compile(r"\{(\w+)\}")


def template_renames(pairs, fields):
    """
    Renames both ways, for `rename_keys`, from (foreign, official) key templates: literal text
    with {field}s, each the regular expression `fields` gives it, matched from the key's start
    (the rest of the key is kept). Returns (foreign -> official, official -> foreign), each in
    the order of `pairs`, so that a specific pair listed before a general one wins both ways.
    """

    def pattern(template):
        parts = _FIELD.split(template)  # literal, field, literal, ...
        return "^" + "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{fields[p]})" for i, p in enumerate(parts))

    def replacement(template):
        parts = _FIELD.split(template)
        return "".join(p.replace("\\", "\\\\") if i % 2 == 0 else f"\\g<{p}>" for i, p in enumerate(parts))

    to_official = [(pattern(foreign), replacement(official)) for foreign, official in pairs]
    to_foreign = [(pattern(official), replacement(foreign)) for foreign, official in pairs]
    return to_official, to_foreign


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
