"""
"Shapes": a synthetic detection dataset that is generated on the machine, so that
the model can be trained and evaluated end to end without downloading anything.

Every image shows 0 to `max_objects` filled shapes (circles, rectangles, triangles,
stars, crosses) of random colour, size, aspect and rotation on a textured, noisy
background crossed by thin distractor lines. The colour never tells the category,
so a detector has to learn the shape itself.

Its panoptic version (`ShapesParams.stuff`) splits the background into up to three
regions of "stuff" told apart by their texture alone (a smooth gradient, stripes,
checks; colours, scale and orientation random): the shapes are its things.

The data is written in COCO format (an image folder and an instances json per
split) under `$DETECTRON2_DATASETS/shapes` (or `./datasets/shapes`) and registered
as `shapes_train` / `shapes_val` with the same metadata as
`register_coco_instances`, so detectron2's `COCOEvaluator` works on it. The panoptic
version goes to `$DETECTRON2_DATASETS/shapes_panoptic`, in COCO panoptic format (a PNG
of segment ids per image and its JSON) beside the same instances JSON with masks, and is
registered as `shapes_panoptic_train` / `shapes_panoptic_val` the way detectron2
registers COCO panoptic, for `COCOPanopticEvaluator`. Images are
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
    "STUFF_CATEGORIES",
    "ShapesParams",
    "DEFAULT_SHAPES_PARAMS",
    "DEFAULT_PANOPTIC_PARAMS",
    "shapes_root",
    "generate_shapes_image",
    "generate_shapes_split",
    "ensure_shapes_split",
    "load_shapes_split",
    "register_shapes_datasets",
    "register_shapes_panoptic_datasets",
]

logger = logging.getLogger(__name__)

# Bump whenever the generator changes what it draws for given parameters, so that
# caches written by an older generator are regenerated instead of silently reused.
# 2: every annotation carries its instance mask; 3: the panoptic files; 4: stuff classes
GENERATOR_VERSION = 4

SHAPE_CATEGORIES = ("circle", "rectangle", "triangle", "star", "cross")
# The background textures of the panoptic version, each a stuff class.
STUFF_CATEGORIES = ("gradient", "stripes", "checks")

SPLITS = ("train", "val")

_MANIFEST = "manifest.json"
_ANNOTATIONS = "annotations.json"
_IMAGES = "images"
# The panoptic version of a split: a PNG of segment ids per image (a segment per stuff class
# present, then the shapes) and its JSON, in COCO panoptic's format.
_PANOPTIC = "panoptic"
_PANOPTIC_JSON = "panoptic.json"
# The one stuff class of a split drawn without `stuff`: the whole textured background.
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
    # Stuff class names, a subset of STUFF_CATEGORIES (ids K+1..K+S): the background is split
    # into up to three regions of these textures. Empty: the one textured background of
    # the detection splits (the stuff class BACKGROUND of their panoptic files).
    stuff: Tuple[str, ...] = ()
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
        for name in ("image_size", "categories", "stuff", "object_size"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = set(self.categories) - set(SHAPE_CATEGORIES)
        if unknown or not self.categories or len(set(self.categories)) != len(self.categories):
            raise ValueError(
                f"categories must be distinct names out of {SHAPE_CATEGORIES}, got {self.categories}"
            )
        if set(self.stuff) - set(STUFF_CATEGORIES) or len(set(self.stuff)) != len(self.stuff):
            raise ValueError(f"stuff must be distinct names out of {STUFF_CATEGORIES}, got {self.stuff}")
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
DEFAULT_PANOPTIC_PARAMS = DEFAULT_SHAPES_PARAMS.replace(stuff=STUFF_CATEGORIES)


def shapes_root(root: Optional[str] = None, name: str = "shapes") -> str:
    """
    The cache folder of the dataset: `root` if given, else
    `$DETECTRON2_DATASETS/<name>`, else `./datasets/<name>`, made absolute so that a
    later change of the working directory does not move it.
    """
    if root is None:
        root = os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), name)
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
    """The detection splits' textured background, (h, w, 3) uint8."""
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
    return np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC))


def _stuff_regions(rng: np.random.Generator, h: int, w: int, num_stuff: int) -> np.ndarray:
    """
    (h, w) stuff class indices: 1 to 3 bands of distinct classes across the image, at a
    random angle, their borders waved, each band at least a tenth of the image across.
    """
    num_regions = int(rng.integers(1, min(3, num_stuff) + 1))
    classes = rng.permutation(num_stuff)[:num_regions]
    phi = rng.uniform(0, np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    across = xs * math.cos(phi) + ys * math.sin(phi)
    along = -xs * math.sin(phi) + ys * math.cos(phi)
    amplitude, wavelength, phase = rng.uniform(0, 0.06 * max(h, w)), rng.uniform(40, 120), rng.uniform(0, 2 * np.pi)
    across += amplitude * np.sin(2 * np.pi * along / wavelength + phase)
    across = (across - across.min()) / max(float(np.ptp(across)), 1.0)
    cuts = (np.arange(1, num_regions) + rng.uniform(-0.4, 0.4, size=num_regions - 1)) / num_regions
    return classes[np.searchsorted(cuts, across)]


def _texture(rng: np.random.Generator, h: int, w: int, name: str) -> np.ndarray:
    """(h, w, 3) float32 of one stuff texture; only its pattern tells its class."""
    base = rng.uniform(50, 205, size=3).astype(np.float32)
    # The second colour close to the first: a pattern faint beside the shapes' contrast, so
    # that a shape's contrast to the pair's mean (what _pick_colour sees) is contrast to each.
    other = np.clip(base + rng.uniform(-1, 1, size=3) * 10 + rng.choice([-1, 1]) * 15, 0, 255)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    u = xs * math.cos(theta) + ys * math.sin(theta)
    if name == "gradient":
        weight = (u - u.min()) / max(float(np.ptp(u)), 1.0)
    elif name == "stripes":
        weight = (np.sin(2 * np.pi * u / rng.uniform(6, 12)) > 0).astype(np.float32)
    elif name == "checks":
        v = -xs * math.sin(theta) + ys * math.cos(theta)
        cell = rng.uniform(5, 10)
        weight = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown stuff {name!r}")
    return base + (other - base) * weight[..., None]


def _stuff_background(rng: np.random.Generator, h: int, w: int, p: ShapesParams):
    """The panoptic splits' background: (h, w, 3) uint8 and the (h, w) stuff class of each pixel."""
    regions = _stuff_regions(rng, h, w, len(p.stuff))
    canvas = np.zeros((h, w, 3), dtype=np.float32)
    for k in np.unique(regions):
        inside = regions == k
        canvas[inside] = _texture(rng, h, w, p.stuff[k])[inside]
    return np.clip(canvas, 0, 255).astype(np.uint8), regions


def _draw_distractors(rng: np.random.Generator, canvas: np.ndarray, p: ShapesParams) -> np.ndarray:
    """Thin lines of random colour across the image; a writable copy, which objects are painted into."""
    h, w = canvas.shape[:2]
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
    image, annotations, _, _ = _draw(params, split, index)
    return image, annotations


def _draw(params: ShapesParams, split: str, index: int):
    """
    generate_shapes_image's image and annotations, and the maps behind them: (h, w) of
    each pixel's shape (k + 1 for the k-th annotation, 0 for none) and, with `stuff`,
    (h, w) of each pixel's stuff class under the shapes (else None).
    """
    p = params
    rng = np.random.default_rng([p.seed, SPLITS.index(split), index])
    h, w = _image_size(rng, p)

    if p.stuff:
        canvas, stuff_map = _stuff_background(rng, h, w, p)
    else:
        canvas, stuff_map = _background(rng, h, w, p), None
    canvas = _draw_distractors(rng, canvas, p)
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
    return canvas, annotations, labels, stuff_map


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


def _panoptic_segments(labels, stuff_map, params: ShapesParams):
    """
    An image's segment ids, (h, w), and its stuff segments: one per stuff class present
    (id 1 + its index), then a segment per shape (id S + 1 + k for its k-th annotation,
    S the number of stuff classes). A stuff segment is (id, stuff index, area, bbox).
    """
    stuff_map = np.zeros(labels.shape, dtype=np.int64) if stuff_map is None else stuff_map
    num_stuff = max(1, len(params.stuff))
    ids = np.where(labels > 0, labels.astype(np.uint32) + num_stuff, stuff_map.astype(np.uint32) + 1)
    segments = []
    for k in range(num_stuff):
        ys, xs = np.nonzero(ids == k + 1)
        if len(xs):
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            segments.append((k + 1, k, int(len(xs)), bbox))
    return ids, segments


def _draw_and_save(params: ShapesParams, split: str, image_dir: str, index: int):
    image, anns, labels, stuff_map = _draw(params, split, index)
    ids, stuff_segments = _panoptic_segments(labels, stuff_map, params)
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
    return file_name, image.shape[0], image.shape[1], anns, stuff_segments


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
    for index, (file_name, h, w, anns, _) in enumerate(results):
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
    _write_panoptic_json(params, out_dir, coco, [r[-1] for r in results])

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


def stuff_classes(params: ShapesParams) -> Tuple[str, ...]:
    """The stuff classes of a split's panoptic files, after the things: `stuff`, or the one BACKGROUND."""
    return params.stuff or (BACKGROUND,)


def _write_panoptic_json(params, out_dir, coco, stuff_segments):
    """COCO panoptic's JSON of a split: each image's stuff segments, then its shapes as things."""
    num_things, num_stuff = len(params.categories), len(stuff_classes(params))
    by_image = {image["id"]: [] for image in coco["images"]}
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    annotations = []
    for image, stuff in zip(coco["images"], stuff_segments):
        segments = [
            {"id": id, "category_id": num_things + 1 + k, "iscrowd": 0, "area": area, "bbox": bbox}
            for id, k, area, bbox in stuff
        ]
        segments += [
            {"id": num_stuff + 1 + k, "category_id": a["category_id"], "iscrowd": 0, "area": a["area"], "bbox": a["bbox"]}
            for k, a in enumerate(by_image[image["id"]])
        ]
        annotations.append({"image_id": image["id"], "file_name": f"{image['id'] - 1:06d}.png", "segments_info": segments})
    categories = [{**c, "isthing": 1} for c in coco["categories"]]
    categories += [
        {"id": num_things + 1 + k, "name": name, "supercategory": "stuff", "isthing": 0}
        for k, name in enumerate(stuff_classes(params))
    ]
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


def load_shapes_panoptic_split(split: str, root: Optional[str] = None, params: ShapesParams = DEFAULT_PANOPTIC_PARAMS):
    """
    Generate the split if needed, then load its panoptic version as detectron2's panoptic
    dataset dicts: the image, the PNG of segment ids, the segments with contiguous
    categories (the shapes, then the stuff classes).
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


def _register_splits(prefix: str, root: str, load, panoptic: bool = False, **metadata) -> Tuple[str, ...]:
    """
    Register `{prefix}_{split}` of every split under `root`: its dicts from `load(split, name)`,
    its metadata `metadata` with the split's "json_file" and "image_root" (and, `panoptic`,
    "panoptic_root" and "panoptic_json"). Registering again replaces: another root or other
    parameters.
    """
    names = []
    for split in SPLITS:
        name = f"{prefix}_{split}"
        json_file, image_root = split_paths(root, split)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda split=split, name=name: load(split, name))
        split_dir = os.path.dirname(json_file)
        if panoptic:
            metadata.update(panoptic_root=os.path.join(split_dir, _PANOPTIC), panoptic_json=os.path.join(split_dir, _PANOPTIC_JSON))
        MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, **metadata)
        names.append(name)
    return tuple(names)


def register_shapes_datasets(
    root: Optional[str] = None, params: ShapesParams = DEFAULT_SHAPES_PARAMS, prefix: str = "shapes"
) -> Tuple[str, ...]:
    """
    Register `{prefix}_train` and `{prefix}_val` in detectron2's catalogs, as
    `register_coco_instances` would.

    Nothing is generated here: a split is drawn the first time it is loaded with
    `DatasetCatalog.get`. Calling this again replaces the earlier registration,
    e.g. to point to another root or to use other parameters.

    Returns:
        the registered dataset names.
    """
    root = shapes_root(root)
    return _register_splits(
        prefix,
        root,
        lambda split, name: load_shapes_split(split, root, params, name),
        thing_classes=list(params.categories),
        # Set here too, not only when the data is loaded, so that an evaluator
        # built before the first load maps category ids right.
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(params.categories))},
        evaluator_type="coco",
        shapes_params=dataclasses.asdict(params),
    )


def register_shapes_panoptic_datasets(
    root: Optional[str] = None, params: ShapesParams = DEFAULT_PANOPTIC_PARAMS, prefix: str = "shapes_panoptic"
) -> Tuple[str, ...]:
    """
    Register the panoptic version, `{prefix}_train` and `{prefix}_val`, as detectron2 registers
    COCO panoptic (`register_coco_panoptic`): records with "pan_seg_file_name" and
    "segments_info", one contiguous id space for things and stuff, the instances JSON as
    "json_file" for the things' COCOEvaluator. `root` defaults to
    `$DETECTRON2_DATASETS/shapes_panoptic`; drawn lazily as register_shapes_datasets.

    Returns:
        the registered dataset names.
    """
    root = shapes_root(root, "shapes_panoptic")
    classes = [*params.categories, *stuff_classes(params)]
    num_things = len(params.categories)
    return _register_splits(
        prefix,
        root,
        lambda split, name: load_shapes_panoptic_split(split, root, params),
        panoptic=True,
        thing_classes=classes,
        stuff_classes=classes,
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(num_things)},
        stuff_dataset_id_to_contiguous_id={i + 1: i for i in range(num_things, len(classes))},
        evaluator_type="coco_panoptic_seg",
        label_divisor=1000,
        ignore_label=255,
        shapes_params=dataclasses.asdict(params),
    )
