from .datasets import register_coco_dataset, register_coco_datasets
from .shapes import ShapesParams, register_shapes_datasets, register_shapes_panoptic_datasets

# Registration only: the images are drawn on the first DatasetCatalog.get.
register_shapes_datasets()
register_shapes_panoptic_datasets()
