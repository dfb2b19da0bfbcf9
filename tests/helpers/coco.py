"""A tiny COCO-format dataset written on the fly: an image folder and an annotation file."""
import json
import os

import numpy as np
from PIL import Image

# non-contiguous ids, listed out of order, as users' files often are
CATEGORIES = ({"id": 7, "name": "dog"}, {"id": 3, "name": "car"}, {"id": 11, "name": "person"})


def write_coco_dataset(folder, num_images=4, categories=CATEGORIES, size=(64, 80), seed=0):
    """Images with one filled box per category; returns (json_file, image_root)."""
    rng = np.random.default_rng(seed)
    image_root = os.path.join(folder, "images")
    os.makedirs(image_root, exist_ok=True)
    images, annotations = [], []
    h, w = size
    for index in range(num_images):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for k, category in enumerate(categories):
            x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            bw, bh = int(rng.integers(8, 20)), int(rng.integers(8, 20))
            pixels[y : y + bh, x : x + bw] = 60 * (k + 1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": category["id"],
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
        name = f"{index:03d}.png"
        Image.fromarray(pixels).save(os.path.join(image_root, name))
        images.append({"id": index + 1, "file_name": name, "height": h, "width": w})
    json_file = os.path.join(folder, "annotations.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": list(categories)}, f)
    return json_file, image_root
