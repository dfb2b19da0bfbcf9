"""
Hugging Face transformers 5 built on the fly, for the tests that compare with its models:
imported from the folder `make test` installs it into.
"""
import os
import sys

import pytest
import torch

from .paths import REPO

TRANSFORMERS_DIR = os.environ.get("CONDITIONAL_DETR_TRANSFORMERS", os.path.join(REPO, ".venv", "transformers"))
INSTALL = (
    f"pip install --target {TRANSFORMERS_DIR} transformers==5.23.0 && pip install --target {TRANSFORMERS_DIR} "
    "--no-deps timm==1.0.31, then remove the numpy it put there (make test does)"
)


def import_transformers():
    """transformers; the calling test skips, saying how to install it, where it is missing."""
    if not os.path.isdir(os.path.join(TRANSFORMERS_DIR, "transformers")):
        pytest.skip(f"transformers not found in {TRANSFORMERS_DIR}: {INSTALL}")
    if TRANSFORMERS_DIR not in sys.path:
        sys.path.append(TRANSFORMERS_DIR)  # after the project's own packages, which keep precedence
    import transformers

    return transformers


def build_hf_model(kind, folder, seed=0, **settings):
    """
    transformers' `kind` ("ConditionalDetr", "Detr", "DeformableDetr") with random weights (a
    timm ResNet-50) and its config's `settings`, saved with save_pretrained.
    """
    transformers = import_transformers()
    config = getattr(transformers, f"{kind}Config")(
        use_pretrained_backbone=False, num_labels=91, auxiliary_loss=True, **settings
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForObjectDetection")(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            # random statistics and class biases, so that a wrong mapping shows
            if name.endswith(("running_mean", "running_var")):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + (0.5 if name.endswith("running_var") else -0.5))
            elif name == "class_labels_classifier.bias":
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 2)
    model.save_pretrained(folder)
    return model


def hf_outputs(model, images_rgb):
    """
    The logits and boxes of every decoder layer (of the last alone where the model's config
    has no auxiliary_loss) for uint8 RGB CHW images of one size, as transformers computes them.
    """
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = torch.stack([(image.float() / 255 - mean) / std for image in images_rgb])
    mask = torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.long)
    if not model.config.auxiliary_loss:
        with torch.no_grad():
            out = model(pixel_values=pixels, pixel_mask=mask)
        return [(out.logits, out.pred_boxes)]
    # transformers returns every layer's outputs only with a loss: any targets will do
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])} for _ in images_rgb]
    with torch.no_grad():
        out = model(pixel_values=pixels, pixel_mask=mask, labels=labels)
    layers = [(aux["logits"], aux["pred_boxes"]) for aux in out.auxiliary_outputs] + [(out.logits, out.pred_boxes)]
    return layers
