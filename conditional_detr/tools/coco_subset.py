"""
Write a COCO-format annotation file with some of another's categories, e.g. to try
fine-tuning on "your own data" cut out of the embedded shapes dataset or out of COCO.

    python -m conditional_detr.tools.coco_subset SRC.json DST.json \\
        --categories circle rectangle=box star [--max-images N]

Categories keep their ids (so leaving some out makes them non-contiguous, as in many
users' files); `old=new` renames one. Images keep their file names, so DST.json goes
with the image folder of SRC.json. Every image is kept (those left without objects too),
or the first N by id with --max-images.
"""

import argparse
import json

__all__ = ["coco_subset", "main"]


def coco_subset(coco, categories, max_images=None):
    """
    Args:
        coco: a COCO-format dict.
        categories: names to keep, each "name" or "name=new_name".
        max_images: keep the first this many images by id (None: all).
    Returns:
        the new COCO-format dict.
    """
    by_name = {c["name"]: c for c in coco["categories"]}
    kept = {}
    for spec in categories:
        name, _, new_name = spec.partition("=")
        if name not in by_name:
            raise ValueError(f"category {name!r} is not in the file; it has {sorted(by_name)}")
        kept[by_name[name]["id"]] = dict(by_name[name], name=new_name or name)
    images = sorted(coco["images"], key=lambda image: image["id"])[:max_images]
    image_ids = {image["id"] for image in images}
    annotations = [
        a for a in coco["annotations"] if a["category_id"] in kept and a["image_id"] in image_ids
    ]
    return {
        **{k: v for k, v in coco.items() if k not in ("images", "annotations", "categories")},
        "images": images,
        "annotations": annotations,
        "categories": sorted(kept.values(), key=lambda c: c["id"]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="COCO-format annotation file")
    parser.add_argument("destination", help="annotation file to write")
    parser.add_argument(
        "--categories", nargs="+", required=True, metavar="NAME[=NEW_NAME]", help="categories to keep"
    )
    parser.add_argument("--max-images", type=int, default=None, help="keep the first N images by id")
    args = parser.parse_args(argv)
    with open(args.source) as f:
        subset = coco_subset(json.load(f), args.categories, args.max_images)
    with open(args.destination, "w") as f:
        json.dump(subset, f)
    names = ", ".join(f"{c['name']} (id {c['id']})" for c in subset["categories"])
    print(
        f"wrote {args.destination}: {len(subset['images'])} images, "
        f"{len(subset['annotations'])} objects of {names}"
    )
    return subset


if __name__ == "__main__":
    main()
