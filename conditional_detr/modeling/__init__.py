from .criterion import SetCriterion
from .matcher import HungarianMatcher
from .detr import DETR
from .meta_arch import ConditionalDETR
from .transformer import Transformer
from .deformable_detr import DeformableDETR
