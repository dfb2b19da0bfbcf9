from .criterion import SetCriterion
from .matcher import HungarianMatcher
from .detr import DETR
from .conditional_detr import ConditionalDETR
from .transformer import Transformer
from .deformable_detr import DeformableDETR
