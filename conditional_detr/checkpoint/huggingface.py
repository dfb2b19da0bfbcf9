"""
Hugging Face transformers checkpoints of `ConditionalDetrForObjectDetection`,
`DetrForObjectDetection` and `DeformableDetrForObjectDetection` (plain, `with_box_refine`,
`two_stage`), as state dicts of this project's `ConditionalDETR`, `DETR` and
`DeformableDETR`: a `save_pretrained` folder (`config.json` and `model.safetensors` or
`pytorch_model.bin`) or its weights file alone, in the layout transformers writes to disk
(that of the files on the hub). Recognized by their keys.

transformers' model is the official one: its timm ResNet is torchvision's network under the
same names, its attention projects queries, keys and values separately (packed here), and
its released heads hold the official 91 COCO-id logits (`id2label`; DETR's with "no object"
last), mapped to detectron2's 80 classes as the official ones are.
"""
import json
import os
import re

import torch

from .foreign import ForeignFormat, rename_keys, template_renames
from .huggingface_config import check_settings
from .official import OFFICIAL_BACKBONE_PREFIX, convert_state_dict, to_official_backbone_key

__all__ = [
    "CONDITIONAL_DETR", "DEFORMABLE_DETR", "DETR", "FORMATS", "HuggingFaceFormat", "class_names_of", "format_of",
    "is_pretrained", "read_pretrained", "weights_file", "write_pretrained",
]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# (transformers' on-disk key, official key) templates, which rename both ways (the project's
# backbone names are made official first); a specific pair is listed before a general one
_FIELDS = {
    "side": "en|de",
    "layer": r"\d+",
    "linear": "1|2",
    "projection": r"(?:sa|ca)_\w+_proj",
    "decoder_part": "query_scale|ref_point_head",
    "head": "class_embed|bbox_embed",
    "transformer_part": "level_embed|reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm",
    "end": r"\.|$",
}
_COMMON_NAMES = [
    ("model.backbone.conv_encoder.model.", OFFICIAL_BACKBONE_PREFIX),
    ("model.input_projection.", "input_proj."),
    ("model.query_position_embeddings.", "query_embed."),
    ("model.{side}coder.layers.{layer}.self_attn.out_proj.", "transformer.{side}coder.layers.{layer}.self_attn.out_proj."),
    ("model.{side}coder.layers.{layer}.fc{linear}.", "transformer.{side}coder.layers.{layer}.linear{linear}."),
    ("model.encoder.layers.{layer}.self_attn_layer_norm.", "transformer.encoder.layers.{layer}.norm1."),
    ("model.encoder.layers.{layer}.final_layer_norm.", "transformer.encoder.layers.{layer}.norm2."),
    ("model.decoder.layers.{layer}.self_attn_layer_norm.", "transformer.decoder.layers.{layer}.norm1."),
    ("model.decoder.layers.{layer}.encoder_attn_layer_norm.", "transformer.decoder.layers.{layer}.norm2."),
    ("model.decoder.layers.{layer}.final_layer_norm.", "transformer.decoder.layers.{layer}.norm3."),
    ("model.decoder.layernorm.", "transformer.decoder.norm."),
    ("class_labels_classifier.", "class_embed."),
    ("bbox_predictor.", "bbox_embed."),
]
# Conditional DETR's decoder: its attention's projections one by one
_CONDITIONAL_DETR_NAMES = [
    ("model.decoder.layers.{layer}.encoder_attn.out_proj.", "transformer.decoder.layers.{layer}.cross_attn.out_proj."),
    ("model.decoder.layers.{layer}.{projection}.", "transformer.decoder.layers.{layer}.{projection}."),
    ("model.decoder.{decoder_part}.", "transformer.decoder.{decoder_part}."),
] + _COMMON_NAMES
# DETR's decoder: torch's multi-head attention for the cross-attention too
_DETR_NAMES = [
    ("model.decoder.layers.{layer}.encoder_attn.out_proj.", "transformer.decoder.layers.{layer}.multihead_attn.out_proj."),
] + _COMMON_NAMES
# Deformable DETR: deformable attention in the encoder and as the decoder's cross-attention,
# whose norms are in the official order (cross-attention norm1, self-attention norm2)
_DEFORMABLE_DETR_NAMES = [
    ("model.decoder.layers.{layer}.self_attn_layer_norm.", "transformer.decoder.layers.{layer}.norm2."),
    ("model.decoder.layers.{layer}.encoder_attn_layer_norm.", "transformer.decoder.layers.{layer}.norm1."),
    ("model.decoder.layers.{layer}.encoder_attn.", "transformer.decoder.layers.{layer}.cross_attn."),
    ("model.encoder.layers.{layer}.self_attn.", "transformer.encoder.layers.{layer}.self_attn."),
    ("model.decoder.{head}.", "transformer.decoder.{head}."),
    ("model.input_proj.", "input_proj."),
    ("model.{transformer_part}{end}", "transformer.{transformer_part}{end}"),
    ("{head}.", "{head}."),
] + _COMMON_NAMES
_IN_PROJ = re.compile(r"^transformer\.(en|de)coder\.layers\.(\d+)\.(self_attn|multihead_attn)\.in_proj_(weight|bias)$")
_UNPACKED = {"self_attn": "self_attn", "multihead_attn": "encoder_attn"}

# separate query, key and value projections, packed into one here (torch's in_proj)
_QKV = re.compile(r"^model\.(en|de)coder\.layers\.(\d+)\.(self_attn|encoder_attn)\.([qkv])_proj\.(weight|bias)$")
_PACKED = {"self_attn": "self_attn", "encoder_attn": "multihead_attn"}


def is_pretrained(path):
    """Whether `path` is a `save_pretrained` folder or one of its weight files."""
    path = str(path)
    return os.path.isdir(path) or path.endswith(".safetensors") or os.path.basename(path) in WEIGHT_FILES


def weights_file(path):
    """The weights file of a `save_pretrained` folder, or `path` itself when it is a file."""
    if not os.path.isdir(path):
        return path
    found = [os.path.join(path, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
    if not found:
        raise ValueError(f"{path}: a folder without {' or '.join(WEIGHT_FILES)}")
    return found[0]


def read_pretrained(path):
    """The state dict and `config.json` (or None) of a `save_pretrained` folder or of its weights file."""
    weights = weights_file(str(path))
    folder = os.path.dirname(weights)
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file

        state_dict = load_file(weights)
    else:
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    config_file = os.path.join(folder, "config.json")
    config = json.load(open(config_file)) if os.path.isfile(config_file) else None
    return state_dict, config


def write_pretrained(folder, state_dict, config, image_processor):
    """A save_pretrained folder: model.safetensors, config.json and preprocessor_config.json."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file(state_dict, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    for name, contents in (("config.json", config), ("preprocessor_config.json", image_processor)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(contents, f, indent=2, sort_keys=True)


def class_names_of(config):
    """The names of `config.json`'s `id2label`, or None where it has none or is COCO's 91 ids (with "N/A" gaps)."""
    labels = (config or {}).get("id2label")
    if not labels:
        return None
    names = [labels[str(i)] if str(i) in labels else labels[i] for i in range(len(labels))]
    return None if "N/A" in names else names


def _complete_deformable_detr(converted):
    """
    The heads of every decoder layer (and the two-stage proposals) as the official layout
    lists them: transformers writes a head its model ties to another only once (every
    layer's class head is the first layer's but in two-stage; box refinement's heads and
    two-stage's class heads live in the decoder, and the model's own are those).
    """
    layers = len({k.split(".")[3] for k in converted if k.startswith("transformer.decoder.layers.")})
    two_stage = "transformer.enc_output.weight" in converted
    in_decoder = {
        head: any(k.startswith(f"transformer.decoder.{head}.") for k in converted) for head in ("class_embed", "bbox_embed")
    }
    for head, decoder_holds in in_decoder.items():
        first = f"transformer.decoder.{head}.0." if decoder_holds else f"{head}.0."
        suffixes = [k[len(first):] for k in converted if k.startswith(first)]
        for index in range(layers + two_stage):
            for suffix in suffixes:
                own = f"{head}.{index}.{suffix}"
                decoder_key = f"transformer.decoder.{own}"
                value = converted.get(decoder_key) if decoder_holds else converted.get(own, converted[first + suffix])
                converted[own] = value
                if decoder_holds:
                    converted[decoder_key] = value
    return converted


class HuggingFaceFormat(ForeignFormat):
    """One transformers detector's state dicts, read and written."""

    repository = "huggingface/transformers"
    source = "transformers"

    def __init__(self, name, architecture, markers, names, model_type, complete=None):
        renames, self._to_transformers = template_renames(names, _FIELDS)
        super().__init__(name, architecture, markers, renames)
        self._complete = complete
        self.model_type = model_type  # config.json's, and its model class's name
        self.model_class = architecture.replace("DETR", "Detr") + "ForObjectDetection"

    def check_meta(self, meta, filename, cfg=None):
        """
        Refuse, by name, the `config.json` settings (where the file comes with one) that the
        project's model lacks, or that differ from those of `cfg` where given.
        """
        config = meta.get("config") if isinstance(meta, dict) else None
        if config:
            check_settings(config, self.architecture, cfg, filename)

    def convert(self, state_dict, num_classes=80):
        renamed = self.rename({k: v for k, v in state_dict.items() if not _QKV.match(k)})
        for side, layer, attention, kind in {(m[1], m[2], m[3], m[5]) for m in map(_QKV.match, state_dict) if m}:
            prefix = f"model.{side}coder.layers.{layer}.{attention}"
            parts = [state_dict[f"{prefix}.{x}_proj.{kind}"] for x in "qkv"]
            renamed[f"transformer.{side}coder.layers.{layer}.{_PACKED[attention]}.in_proj_{kind}"] = torch.cat(parts)
        if self._complete:
            renamed = self._complete(renamed)
        return convert_state_dict(renamed, num_classes)

    def to_transformers(self, state_dict):
        """
        This project's state dict of the model -> transformers' on-disk one, with every
        class row as it is; converting it back gives `state_dict` exactly, or a ValueError.
        """
        official = {
            to_official_backbone_key(k) if k.startswith("backbone.") else k: v
            for k, v in state_dict.items() if not k.startswith("group_query_embed.")  # training-only queries
        }
        packed = {k: v for k, v in official.items() if _IN_PROJ.match(k)}
        written = rename_keys(
            {k: v for k, v in official.items() if k not in packed}, self._to_transformers, "this project",
            self.architecture, lacking="transformers'",
        )
        for key, value in packed.items():
            side, layer, attention, kind = _IN_PROJ.match(key).groups()
            for name, part in zip("qkv", value.chunk(3)):
                written[f"model.{side}coder.layers.{layer}.{_UNPACKED[attention]}.{name}_proj.{kind}"] = part
        # heads the official layout lists twice are one tensor: safetensors stores each key's own
        written = {k: v.contiguous().clone() for k, v in written.items()}
        back = self.convert(written, num_classes=None)
        expected = {k: v for k, v in state_dict.items() if not k.startswith("group_query_embed.")}
        if back.keys() != expected.keys() or any(not torch.equal(back[k], v.float()) for k, v in expected.items()):
            raise ValueError(f"the {self.architecture} written for transformers does not convert back to itself")
        return written


CONDITIONAL_DETR = HuggingFaceFormat(
    "hf_conditional_detr", "ConditionalDETR",
    ("model.decoder.layers.0.ca_qpos_sine_proj.weight", "class_labels_classifier.weight"), _CONDITIONAL_DETR_NAMES,
    "conditional_detr",
)
DETR = HuggingFaceFormat(
    "hf_detr", "DETR", ("model.decoder.layers.0.encoder_attn.q_proj.weight", "class_labels_classifier.weight"), _DETR_NAMES,
    "detr",
)
DEFORMABLE_DETR = HuggingFaceFormat(
    "hf_deformable_detr", "DeformableDETR",
    ("model.decoder.layers.0.encoder_attn.sampling_offsets.weight", "model.level_embed"), _DEFORMABLE_DETR_NAMES,
    "deformable_detr", _complete_deformable_detr,
)
FORMATS = (CONDITIONAL_DETR, DETR, DEFORMABLE_DETR)


def format_of(architecture):
    """The format of this project's MODEL.META_ARCHITECTURE `architecture`; a ValueError names the others."""
    for fmt in FORMATS:
        if fmt.architecture == architecture:
            return fmt
    raise ValueError(
        f"MODEL.META_ARCHITECTURE {architecture!r} has no transformers equivalent; those with one: "
        f"{', '.join(fmt.architecture for fmt in FORMATS)}"
    )
