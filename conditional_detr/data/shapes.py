"""
"Shapes": a synthetic detection dataset that is generated on the machine, so that
the model can be trained and evaluated end to end without downloading anything.

Every image shows 0 to `max_objects` filled shapes (circles, rectangles, triangles,
stars, crosses) of random colour, size, aspect and rotation on a textured, noisy
background crossed by thin distractor lines. The colour never tells the category,
so a detector has to learn the shape itself.

The data is written in COCO format (an image folder and an instances json per
split) under `$DETECTRON2_DATASETS/shapes` (or `./datasets/shapes`) and registered
as `shapes_train` / `shapes_val` with the same metadata as
`register_coco_instances`, so detectron2's `COCOEvaluator` works on it. Images are
generated lazily, the first time a split is loaded through `DatasetCatalog.get`, and
cached: a manifest in every split folder records the generator version and the
parameters, and a split whose manifest does not match is generated again.
"""

import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, ImageDraw

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

__all__ = [
    "SHAPE_CATEGORIES",
    "ShapesParams",
    "DEFAULT_SHAPES_PARAMS",
    "shapes_root",
    "generate_shapes_image",
    "generate_shapes_split",
    "ensure_shapes_split",
    "load_shapes_split",
    "register_shapes_datasets",
]

logger = logging.getLogger(__name__)

# Bump whenever the generator changes what it draws for given parameters, so that
# caches written by an older generator are regenerated instead of silently reused.
GENERATOR_VERSION = 3  # 2: every annotation carries its instance mask; 3: the panoptic files

SHAPE_CATEGORIES = ("circle", "rectangle", "triangle", "star", "cross")

SPLITS = ("train", "val")

_MANIFEST = "manifest.json"
_ANNOTATIONS = "annotations.json"
_IMAGES = "images"
# The panoptic version of a split: a PNG of segment ids per image (the shapes, and the background
# as one stuff segment) and its JSON, in COCO panoptic's format.
_PANOPTIC = "panoptic"
_PANOPTIC_JSON = "panoptic.json"
BACKGROUND = "background"


@dataclass(frozen=True)
class ShapesParams:
    """
    Everything that determines the generated data. Two equal parameter sets give
    byte-identical datasets; any change invalidates the cache of the affected split.
    Sizes are in pixels. The defaults aim at a task that a small detector learns in
    minutes yet cannot solve by colour or by "anything not flat"; the fields from
    `object_size` on are the difficulty knobs.
    """

    # Nominal (height, width); with jitter every side is scaled by U(1 - j, 1 + j).
    image_size: Tuple[int, int] = (128, 128)
    image_size_jitter: float = 0.0
    num_train: int = 2000
    num_val: int = 200
    seed: int = 0
    # Category names, a subset (in any order) of SHAPE_CATEGORIES; ids are 1..K.
    categories: Tuple[str, ...] = SHAPE_CATEGORIES
    # Objects per image are drawn uniformly from [min_objects, max_objects]; fewer
    # end up in the image when no free place is found for one.
    min_objects: int = 0
    max_objects: int = 4
    # Geometric mean of the object's width and height, log-uniform in this range;
    # the shorter side is never below the lower bound.
    object_size: Tuple[int, int] = (24, 72)
    # Width / height (before rotation) is log-uniform in [1 / a, a].
    max_aspect: float = 2.0
    # Rotation, uniform in [-r, r] degrees.
    max_rotation: float = 15.0
    # The largest fraction of an object that later objects may hide.
    max_occlusion: float = 0.1
    # Least RGB distance between an object's colour and what lies under it.
    min_contrast: float = 90.0
    # Amplitude of the smooth colour field and of the blotchy texture of the background.
    background_texture: float = 20.0
    # Number of thin distractor lines per image, uniform in [0, max_distractors].
    max_distractors: int = 1
    # Peak-to-peak brightness change of the linear shading inside an object.
    object_shading: float = 20.0
    # Standard deviation of the per-pixel Gaussian noise over the whole image.
    pixel_noise: float = 4.0
    # "jpg" (quality 95) or "png".
    image_format: str = "jpg"

    def __post_init__(self):
        # Lists given by a caller or read from json are stored as tuples, so that
        # the dataclass stays hashable and compares equal to the defaults.
        for name in ("image_size", "categories", "object_size"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = set(self.categories) - set(SHAPE_CATEGORIES)
        if unknown or not self.categories or len(set(self.categories)) != len(self.categories):
            raise ValueError(
                f"categories must be distinct names out of {SHAPE_CATEGORIES}, got {self.categories}"
            )
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError("need 0 <= min_objects <= max_objects")
        if not 0 < self.object_size[0] <= self.object_size[1]:
            raise ValueError(f"bad object_size {self.object_size}")
        if not 0 <= self.image_size_jitter < 1:
            raise ValueError("image_size_jitter must be in [0, 1)")
        if self.max_aspect < 1:
            raise ValueError("max_aspect must be >= 1")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be 'jpg' or 'png', got {self.image_format!r}")

    def replace(self, **changes) -> "ShapesParams":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def num_images(self, split: str) -> int:
        """Number of images of "train" or "val"."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")
        return self.num_train if split == "train" else self.num_val


DEFAULT_SHAPES_PARAMS = ShapesParams()


def shapes_root(root: Optional[str] = None) -> str:
    """
    The cache folder of the dataset: `root` if given, else
    `$DETECTRON2_DATASETS/shapes`, else `./datasets/shapes`, made absolute so that a
    later change of the working directory does not move it.
    """
    if root is None:
        root = os.path.join(
            os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "shapes"
        )
    return os.path.abspath(os.path.expanduser(root))


# ---------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------


def _normalize(poly: np.ndarray) -> np.ndarray:
    # Every template fills [-1, 1]^2 so that size and aspect mean the same for all.
    lo, hi = poly.min(0), poly.max(0)
    return (poly - (lo + hi) / 2) / ((hi - lo) / 2)


def _template(category: str, rng: np.random.Generator) -> np.ndarray:
    """Polygon of one shape, (N, 2) as (x, y), y pointing down, filling [-1, 1]^2."""
    if category == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if category == "rectangle":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    if category == "triangle":
        # A random apex position gives scalene, isosceles and right triangles.
        apex = rng.uniform(-1, 1)
        return np.array([[apex, -1], [1, 1], [-1, 1]], dtype=np.float64)
    if category == "star":
        inner = rng.uniform(0.38, 0.5)
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return _normalize(np.stack([r * np.cos(t), r * np.sin(t)], 1))
    if category == "cross":
        a = rng.uniform(0.25, 0.4)  # half width of an arm
        # fmt: off
        return np.array(
            [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a],
             [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]],
            dtype=np.float64,
        )
        # fmt: on
    raise ValueError(f"unknown shape {category!r}")


@functools.lru_cache(maxsize=4)
def _noise_bank(seed: int, sigma: float, side: int) -> np.ndarray:
    # Drawing fresh Gaussian noise for every pixel of every image costs more than
    # everything else together; random crops of one shared tile look the same to a
    # detector and keep generation within seconds.
    # Two-word seed: a stream apart from the per-image ones, (seed, split, index).
    rng = np.random.default_rng([seed, 0x6E6F697365])
    noise = rng.standard_normal((side, side, 3), dtype=np.float32) * sigma
    noise = np.round(noise).astype(np.int16)
    noise.flags.writeable = False
    return noise


def _background(rng: np.random.Generator, h: int, w: int, p: ShapesParams) -> np.ndarray:
    """A textured background with distractor lines, (h, w, 3) uint8."""
    # A base colour, a smooth colour drift across the image and fine blotches, so
    # that the model cannot find objects by looking for whatever is not flat.
    # Built at a quarter of the resolution and upsampled once: the texture is
    # smooth anyway and full-resolution arithmetic would double the drawing time.
    amp = p.background_texture
    lh, lw = max(2, (h + 3) // 4), max(2, (w + 3) // 4)
    base = rng.uniform(30, 225, size=3)
    coarse = np.clip(128 + amp * rng.uniform(-1, 1, size=(3, 3, 3)), 0, 255).astype(np.uint8)
    drift = np.asarray(Image.fromarray(coarse).resize((lw, lh), Image.BILINEAR), dtype=np.float32)
    grid = rng.integers(0, 256, size=(max(2, h // 12), max(2, w // 12)), dtype=np.uint8)
    blotch = np.asarray(Image.fromarray(grid).resize((lw, lh), Image.BICUBIC), dtype=np.float32)
    low = base + (drift - 128) + (blotch - 127.5)[..., None] * (0.5 * amp / 127.5)
    low = np.clip(low, 0, 255).astype(np.uint8)
    canvas = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC))

    n_lines = int(rng.integers(0, p.max_distractors + 1))
    if n_lines:
        img = Image.fromarray(canvas)
        draw = ImageDraw.Draw(img)
        for _ in range(n_lines):
            x0, x1 = rng.uniform(0, w, size=2)
            y0, y1 = rng.uniform(0, h, size=2)
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 3)))
        canvas = np.asarray(img)
    # Writable copy: objects are painted into it.
    return np.array(canvas)


def _pick_colour(
    rng: np.random.Generator, under: List[np.ndarray], min_contrast: float
) -> np.ndarray:
    """A random colour at least `min_contrast` away from every colour in `under`."""
    under = np.stack(under)
    candidates = rng.uniform(0, 255, size=(16, 3)).astype(np.float32)
    dist = np.linalg.norm(candidates[:, None, :] - under[None], axis=2).min(1)
    good = np.nonzero(dist >= min_contrast)[0]
    if len(good):
        return candidates[good[0]]
    # Crowded colour space under the object: fall back to the corner of the RGB
    # cube opposite to the mean of what is under it.
    return np.where(under.mean(0) < 127.5, 255.0, 0.0).astype(np.float32)


def _place_object(rng, canvas, labels, objects, category, p) -> bool:
    """
    Try to draw one object; on success update `canvas` and `labels` in place, append
    (crop box, full area) to `objects` and return True. Rejected when no position
    keeps every earlier object at least (1 - max_occlusion) visible.
    """
    h, w = labels.shape
    lo, hi = p.object_size
    hi = min(hi, 0.9 * min(h, w))
    lo = min(lo, hi)
    size = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    aspect = math.exp(rng.uniform(-math.log(p.max_aspect), math.log(p.max_aspect)))
    bw, bh = size * math.sqrt(aspect), size / math.sqrt(aspect)
    shorter = min(bw, bh)
    if shorter < lo:
        bw, bh = bw * lo / shorter, bh * lo / shorter
    theta = math.radians(rng.uniform(-p.max_rotation, p.max_rotation))
    unit = _template(category, rng)
    x, y = unit[:, 0] * (bw / 2), unit[:, 1] * (bh / 2)
    cos, sin = math.cos(theta), math.sin(theta)
    poly = np.stack([x * cos - y * sin, x * sin + y * cos], 1)
    poly -= poly.min(0)
    span = poly.max(0)
    if span[0] > w - 2 or span[1] > h - 2:
        return False

    for _ in range(10):
        # Whole objects only: the box is placed inside the image.
        x0 = rng.uniform(0, w - 1 - span[0])
        y0 = rng.uniform(0, h - 1 - span[1])
        cx, cy = int(x0), int(y0)
        local = poly + [x0 - cx, y0 - cy]
        cw = min(int(math.ceil(local[:, 0].max())) + 1, w - cx)
        ch = min(int(math.ceil(local[:, 1].max())) + 1, h - cy)
        mask_img = Image.new("L", (cw, ch), 0)
        ImageDraw.Draw(mask_img).polygon([tuple(v) for v in local], fill=1)
        mask = np.asarray(mask_img, dtype=bool)
        area = int(np.count_nonzero(mask))
        if area == 0:
            return False

        lab = labels[cy : cy + ch, cx : cx + cw]
        hidden = np.bincount(lab[mask], minlength=len(objects) + 1)
        ok = True
        for k in np.nonzero(hidden[1:])[0]:
            (ox, oy, ow, oh), full_area = objects[k]
            visible = np.count_nonzero(labels[oy : oy + oh, ox : ox + ow] == k + 1)
            if visible - hidden[k + 1] < (1 - p.max_occlusion) * full_area:
                ok = False
                break
        if not ok:
            continue

        patch = canvas[cy : cy + ch, cx : cx + cw]
        under = [patch[mask & (lab == k)].mean(0) for k in np.unique(lab[mask])]
        colour = _pick_colour(rng, under, p.min_contrast)
        # Linear shading in a random direction, so that objects are not flat either.
        phi = rng.uniform(0, 2 * np.pi)
        xs = np.arange(cw, dtype=np.float32) * math.cos(phi)
        ys = np.arange(ch, dtype=np.float32) * math.sin(phi)
        ramp = xs[None, :] + ys[:, None]
        ramp = ramp[mask]
        ramp = (ramp - ramp.mean()) / max(float(np.ptp(ramp)), 1.0)
        fill = colour + (p.object_shading * ramp)[:, None]
        patch[mask] = np.clip(fill, 0, 255).astype(np.uint8)
        lab[mask] = len(objects) + 1
        objects.append(((cx, cy, cw, ch), area))
        return True
    return False


def _image_size(rng: np.random.Generator, p: ShapesParams) -> Tuple[int, int]:
    h, w = p.image_size
    if p.image_size_jitter > 0:
        h = int(round(h * rng.uniform(1 - p.image_size_jitter, 1 + p.image_size_jitter)))
        w = int(round(w * rng.uniform(1 - p.image_size_jitter, 1 + p.image_size_jitter)))
    return h, w


def generate_shapes_image(params: ShapesParams, split: str, index: int):
    """
    Draw one image of a split.

    Deterministic: the image depends only on (params, split, index), not on the
    other images, which lets the images be drawn in any order or in parallel.

    Returns:
        image (H, W, 3) uint8 RGB and a list of annotations, each a dict with
        "category" (name), "bbox" ([x, y, w, h], tight around the visible pixels),
        "area" (the visible pixel count) and "segmentation", the visible pixels as COCO's
        compressed RLE: exactly those the shape was drawn on and no later one covers.
    """
    p = params
    rng = np.random.default_rng([p.seed, SPLITS.index(split), index])
    h, w = _image_size(rng, p)

    canvas = _background(rng, h, w, p)
    labels = np.zeros((h, w), dtype=np.uint16)
    objects: List = []
    placed: List[str] = []
    n = int(rng.integers(p.min_objects, p.max_objects + 1))
    for _ in range(n):
        category = p.categories[int(rng.integers(len(p.categories)))]
        if _place_object(rng, canvas, labels, objects, category, p):
            placed.append(category)

    if p.pixel_noise > 0:
        side = int(math.ceil(max(p.image_size) * (1 + p.image_size_jitter))) + 64
        bank = _noise_bank(p.seed, float(p.pixel_noise), side)
        oy = int(rng.integers(0, side - h + 1))
        ox = int(rng.integers(0, side - w + 1))
        noisy = canvas + bank[oy : oy + h, ox : ox + w]
        canvas = np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)

    annotations = []
    for k, (category, ((cx, cy, cw, ch), _)) in enumerate(zip(placed, objects)):
        visible = labels[cy : cy + ch, cx : cx + cw] == k + 1
        ys, xs = np.nonzero(visible)
        x0, x1, y0, y1 = (
            cx + int(xs.min()),
            cx + int(xs.max()),
            cy + int(ys.min()),
            cy + int(ys.max()),
        )
        mask = np.zeros((h, w), dtype=np.uint8, order="F")
        mask[cy : cy + ch, cx : cx + cw] = visible
        rle = mask_util.encode(mask)
        annotations.append(
            {
                "category": category,
                "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                "area": int(len(xs)),
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            }
        )
    return canvas, annotations


# ---------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------


def _split_spec(params: ShapesParams, split: str) -> Dict:
    # The other split's size does not change this split, so it is left out: tuning
    # num_train does not throw away a generated validation set and vice versa.
    spec = dataclasses.asdict(params)
    spec.pop("num_train")
    spec.pop("num_val")
    spec["num_images"] = params.num_images(split)
    spec["split"] = split
    # Through json, so that it compares equal to what a manifest holds (tuples vs lists).
    return json.loads(json.dumps(spec))


def _split_dir(root: str, split: str) -> str:
    return os.path.join(root, split)


def split_paths(root: Optional[str], split: str) -> Tuple[str, str]:
    """(json_file, image_root) of a split under a cache root."""
    d = _split_dir(shapes_root(root), split)
    return os.path.join(d, _ANNOTATIONS), os.path.join(d, _IMAGES)


def _is_current(split_dir: str, params: ShapesParams, split: str) -> bool:
    try:
        with open(os.path.join(split_dir, _MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return (
        manifest.get("version") == GENERATOR_VERSION
        and manifest.get("params") == _split_spec(params, split)
        and os.path.isfile(os.path.join(split_dir, _ANNOTATIONS))
    )


def _panoptic_ids(height, width, annotations):
    """The segment ids of an image: 1 for the background, 2 + k for its k-th shape's visible pixels."""
    ids = np.ones((height, width), dtype=np.uint32)
    for k, ann in enumerate(annotations):
        ids[mask_util.decode(ann["segmentation"]).astype(bool)] = k + 2
    return ids


def _draw_and_save(params: ShapesParams, split: str, image_dir: str, index: int):
    image, anns = generate_shapes_image(params, split, index)
    ids = _panoptic_ids(*image.shape[:2], anns)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256**2], -1).astype(np.uint8)
    panoptic_dir = os.path.join(os.path.dirname(image_dir), _PANOPTIC)
    Image.fromarray(rgb).save(os.path.join(panoptic_dir, f"{index:06d}.png"), compress_level=1)
    file_name = f"{index:06d}.{params.image_format}"
    path = os.path.join(image_dir, file_name)
    if params.image_format == "jpg":
        Image.fromarray(image).save(path, quality=95)
    else:
        # Lossless anyway; the fastest level keeps generation within seconds.
        Image.fromarray(image).save(path, compress_level=1)
    return file_name, image.shape[0], image.shape[1], anns


def _map_indices(fn, n: int, num_workers: Optional[int]) -> List:
    """[fn(0), ..., fn(n - 1)], spread over worker processes where possible."""
    if num_workers is None:
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        num_workers = min(4, len(cores) if cores else os.cpu_count() or 1)
    # Too few images to pay for starting workers.
    num_workers = min(num_workers, n // 32)
    if num_workers <= 1:
        return [fn(i) for i in range(n)]
    # Drawing is mostly Python code that holds the GIL, so threads barely overlap.
    # Forked processes share what is already imported and start in milliseconds;
    # where fork is missing or not allowed (inside a daemonic data-loader worker),
    # threads still overlap the resizing and the encoding, which release the GIL.
    if (
        "fork" in multiprocessing.get_all_start_methods()
        and not multiprocessing.current_process().daemon
    ):
        pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("fork"))
        chunksize = max(1, n // (8 * num_workers))
    else:
        pool = ThreadPoolExecutor(num_workers)
        chunksize = 1
    with pool:
        return list(pool.map(fn, range(n), chunksize=chunksize))


def generate_shapes_split(
    params: ShapesParams, split: str, out_dir: str, num_workers: Optional[int] = None
) -> Dict:
    """
    Write one split in COCO format into `out_dir` (which must not exist):
    `images/`, `annotations.json` and `manifest.json`. No caching, no atomicity:
    see `ensure_shapes_split` for that.

    Args:
        num_workers: processes drawing images (default: up to 4, one per core);
            does not change the output.
    Returns:
        the manifest.
    """
    start = time.perf_counter()
    image_dir = os.path.join(out_dir, _IMAGES)
    os.makedirs(image_dir)
    os.makedirs(os.path.join(out_dir, _PANOPTIC))
    work = functools.partial(_draw_and_save, params, split, image_dir)
    results = _map_indices(work, params.num_images(split), num_workers)

    cat_ids = {name: i + 1 for i, name in enumerate(params.categories)}
    images, annotations = [], []
    for index, (file_name, h, w, anns) in enumerate(results):
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for ann in anns:
            annotations.append(
                {
                    # pycocotools treats annotation id 0 as "unmatched": start at 1.
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_ids[ann["category"]],
                    "bbox": ann["bbox"],
                    "area": ann["area"],
                    "segmentation": ann["segmentation"],
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {
            "description": f"synthetic shapes, {split} split",
            "version": str(GENERATOR_VERSION),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i, "name": name, "supercategory": "shape"} for name, i in cat_ids.items()
        ],
    }
    with open(os.path.join(out_dir, _ANNOTATIONS), "w") as f:
        json.dump(coco, f)
    _write_panoptic_json(params, split, out_dir, coco)

    manifest = {
        "version": GENERATOR_VERSION,
        "params": _split_spec(params, split),
        "num_images": len(images),
        "num_annotations": len(annotations),
        "generation_seconds": round(time.perf_counter() - start, 3),
    }
    with open(os.path.join(out_dir, _MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def _write_panoptic_json(params, split, out_dir, coco):
    """COCO panoptic's JSON of a split: each image's shapes as things, its background as a stuff segment."""
    background_id = len(params.categories) + 1
    by_image = {image["id"]: [] for image in coco["images"]}
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    annotations = []
    for image in coco["images"]:
        anns = by_image[image["id"]]
        background = image["height"] * image["width"] - sum(a["area"] for a in anns)
        segments = [{"id": 1, "category_id": background_id, "iscrowd": 0, "area": background,
                     "bbox": [0, 0, image["width"], image["height"]]}] if background else []
        segments += [
            {"id": k + 2, "category_id": a["category_id"], "iscrowd": 0, "area": a["area"], "bbox": a["bbox"]}
            for k, a in enumerate(anns)
        ]
        annotations.append({"image_id": image["id"], "file_name": f"{image['id'] - 1:06d}.png", "segments_info": segments})
    categories = [{**c, "isthing": 1} for c in coco["categories"]]
    categories.append({"id": background_id, "name": BACKGROUND, "supercategory": BACKGROUND, "isthing": 0})
    with open(os.path.join(out_dir, _PANOPTIC_JSON), "w") as f:
        json.dump({"info": coco["info"], "images": coco["images"], "annotations": annotations, "categories": categories}, f)


# A generation takes seconds; a temporary folder this old belongs to a killed one.
_LEFTOVER_AGE_S = 3600


def _remove_leftovers(root: str, split: str):
    now = time.time()
    for name in os.listdir(root):
        if not name.startswith((f".{split}.tmp-", f".{split}.old-")):
            continue
        path = os.path.join(root, name)
        try:
            if now - os.stat(path).st_mtime > _LEFTOVER_AGE_S:
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:
            pass


def ensure_shapes_split(
    split: str,
    root: Optional[str] = None,
    params: ShapesParams = DEFAULT_SHAPES_PARAMS,
    num_workers: Optional[int] = None,
) -> Tuple[str, str]:
    """
    Make sure that an up-to-date copy of a split is on disk, generating it if it is
    missing or was generated with other parameters or another generator version.

    The split is drawn into a temporary folder next to its final place and renamed
    into place only when complete, so an interrupted generation never leaves a
    partial dataset behind, and concurrent callers (e.g. one per GPU) end up with
    one complete copy.

    Returns:
        (json_file, image_root)
    """
    root = shapes_root(root)
    final = _split_dir(root, split)
    json_file, image_root = split_paths(root, split)
    if _is_current(final, params, split):
        return json_file, image_root

    os.makedirs(root, exist_ok=True)
    _remove_leftovers(root, split)
    tmp = tempfile.mkdtemp(prefix=f".{split}.tmp-", dir=root)
    try:
        out = os.path.join(tmp, split)
        logger.info(
            f"Generating the shapes {split} split ({params.num_images(split)} images) in {final} ..."
        )
        manifest = generate_shapes_split(params, split, out, num_workers=num_workers)
        logger.info(
            f"Generated {manifest['num_images']} images with {manifest['num_annotations']} objects "
            f"in {manifest['generation_seconds']:.1f}s"
        )
        if _is_current(final, params, split):
            # A concurrent caller (e.g. another GPU's process) finished first: keep
            # its copy, which that caller may be reading already.
            return json_file, image_root
        if os.path.exists(final):
            # Stale copy: move it aside first, as a directory cannot be renamed over
            # a non-empty one. A crash right here leaves no split, i.e. a regeneration.
            stale = os.path.join(root, f".{split}.old-{uuid.uuid4().hex}")
            try:
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except FileNotFoundError:
                pass  # moved away meanwhile by a concurrent caller
        try:
            os.rename(out, final)
        except OSError:
            # A concurrent caller put its copy in place first; fine if it is current.
            if not _is_current(final, params, split):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return json_file, image_root


def load_shapes_split(
    split: str,
    root: Optional[str] = None,
    params: ShapesParams = DEFAULT_SHAPES_PARAMS,
    dataset_name: Optional[str] = None,
) -> List[Dict]:
    """
    Generate the split if needed, then load it as detectron2 dataset dicts.
    """
    json_file, image_root = ensure_shapes_split(split, root, params)
    return load_coco_json(json_file, image_root, dataset_name)


def load_shapes_panoptic_split(split: str, root: Optional[str] = None, params: ShapesParams = DEFAULT_SHAPES_PARAMS):
    """
    Generate the split if needed, then load its panoptic version as detectron2's panoptic
    dataset dicts: the image, the PNG of segment ids, the segments with contiguous
    categories (the shapes, then the background).
    """
    json_file, image_root = ensure_shapes_split(split, root, params)
    split_dir = os.path.dirname(json_file)
    with open(os.path.join(split_dir, _PANOPTIC_JSON)) as f:
        panoptic = json.load(f)
    images = {image["id"]: image for image in panoptic["images"]}
    records = []
    for ann in panoptic["annotations"]:
        image = images[ann["image_id"]]
        segments = [
            {**s, "category_id": s["category_id"] - 1, "isthing": s["category_id"] <= len(params.categories)}
            for s in ann["segments_info"]
        ]
        records.append({
            "file_name": os.path.join(image_root, image["file_name"]), "image_id": image["id"],
            "height": image["height"], "width": image["width"],
            "pan_seg_file_name": os.path.join(split_dir, _PANOPTIC, ann["file_name"]), "segments_info": segments,
        })
    return records


def register_shapes_datasets(
    root: Optional[str] = None, params: ShapesParams = DEFAULT_SHAPES_PARAMS, prefix: str = "shapes"
) -> Tuple[str, ...]:
    """
    Register `{prefix}_train` and `{prefix}_val` in detectron2's catalogs, and their panoptic
    versions `{prefix}_panoptic_train` and `{prefix}_panoptic_val` (the background one stuff
    class after the shapes, evaluated as panoptic segmentation).

    Nothing is generated here: a split is drawn the first time it is loaded with
    `DatasetCatalog.get`. Calling this again replaces the earlier registration,
    e.g. to point to another root or to use other parameters.

    Returns:
        the registered dataset names.
    """
    root = shapes_root(root)
    names = []
    for split in SPLITS:
        name = f"{prefix}_{split}"
        json_file, image_root = split_paths(root, split)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        DatasetCatalog.register(
            name,
            lambda split=split, name=name: load_shapes_split(split, root, params, name),
        )
        MetadataCatalog.get(name).set(
            thing_classes=list(params.categories),
            # Set here too, not only when the data is loaded, so that an evaluator
            # built before the first load maps category ids right.
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(params.categories))},
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            shapes_params=dataclasses.asdict(params),
        )
        names.append(name)
        panoptic_name = f"{prefix}_panoptic_{split}"
        if panoptic_name in DatasetCatalog.list():
            DatasetCatalog.remove(panoptic_name)
        if panoptic_name in MetadataCatalog.list():
            MetadataCatalog.remove(panoptic_name)
        DatasetCatalog.register(panoptic_name, lambda split=split: load_shapes_panoptic_split(split, root, params))
        classes = [*params.categories, BACKGROUND]
        MetadataCatalog.get(panoptic_name).set(
            # as detectron2's COCO panoptic registration: one id space for things and stuff
            thing_classes=classes,
            stuff_classes=classes,
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(params.categories))},
            stuff_dataset_id_to_contiguous_id={len(classes): len(classes) - 1},
            json_file=json_file,
            image_root=image_root,
            panoptic_root=os.path.join(os.path.dirname(json_file), _PANOPTIC),
            panoptic_json=os.path.join(os.path.dirname(json_file), _PANOPTIC_JSON),
            evaluator_type="coco_panoptic_seg",
            label_divisor=1000,
            ignore_label=255,
        )
        names.append(panoptic_name)
    return tuple(names)
