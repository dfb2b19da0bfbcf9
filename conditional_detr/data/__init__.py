from .shapes import ShapesParams, register_shapes_datasets

# Registration only: the images are drawn on the first DatasetCatalog.get.
register_shapes_datasets()
