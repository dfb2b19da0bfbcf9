"""The repository's folders and the configs the tests train and build from."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")
SCRIPTS = os.path.join(REPO, "scripts")
QUICK_SCHEDULES = os.path.join(CONFIGS, "quick_schedules")
BASE_CONFIG = os.path.join(CONFIGS, "Base-ConditionalDETR.yaml")
INSTANT_CONFIG = os.path.join(QUICK_SCHEDULES, "conditional_detr_instant_test.yaml")
DEFORMABLE_INSTANT_CONFIG = os.path.join(QUICK_SCHEDULES, "deformable_detr_instant_test.yaml")

# The official implementations' outputs (see reference_file in helpers.official).
REFERENCE_DIR = os.environ.get(
    "CONDITIONAL_DETR_REFERENCE", os.path.join(os.path.dirname(REPO), "shared", "reference")
)
