# Set-up, demo and tests. `make demo` and `make test` each run `make setup` first,
# which creates .venv/ on a fresh machine and is a no-op on a second run.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1
DETECTRON2_REPUBLISH ?= sal-detectron2==0.7.2
# The exact pins keep a machine-local CPU-only torch wheel (which the PyPI torchvision
# cannot load) from being picked; the machine's own pip configuration stays in force,
# so wheels it already holds on disk are used instead of downloaded. Without a pip
# cache the multi-GB CUDA wheels are not stored a second time.
TORCH_PIP_FLAGS ?= --no-cache-dir
STAMPS := $(VENV)/.stamps

.PHONY: setup demo panoptic-demo test test-fast clean-build

setup: $(STAMPS)/project

$(STAMPS)/venv:
	$(PYTHON) -m venv $(VENV)
	mkdir -p $(STAMPS) && touch $@

# torch/torchvision: an already importable pair is left alone.
$(STAMPS)/torch: $(STAMPS)/venv
	$(PY) -c "import torch, torchvision" 2>/dev/null || \
		$(PIP) install $(TORCH_PIP_FLAGS) "torch==$(TORCH_VERSION)" "torchvision==$(TORCHVISION_VERSION)"
	touch $@

# detectron2: an importable one is left alone; otherwise upstream from GitHub, and
# where GitHub is out of reach the pure-Python PyPI republish (see docs/installation.md).
$(STAMPS)/detectron2: $(STAMPS)/torch scripts/repack_detectron2.py
	$(PIP) install "numpy<2" "setuptools<81" fvcore iopath pycocotools scipy ninja "Pillow>=9" safetensors shapely \
		"opencv-python-headless<4.12" tensorboard
	$(PY) -c "import detectron2" 2>/dev/null || bash scripts/install_detectron2.sh $(PY) "$(DETECTRON2_REPUBLISH)"
	# panopticapi for detectron2's COCOPanopticEvaluator: the official code under the name it imports
	# (its metadata pins numpy<2 and asks for matplotlib and scikit-image, which the code never uses)
	$(PIP) install --no-deps panopticapi-lite==0.2.0
	touch $@

# onnx/onnxruntime: tools/export and its tests (wheels for CPython >= 3.11; they work with numpy<2)
$(STAMPS)/test-deps: $(STAMPS)/venv
	$(PIP) install pytest "numpy<2" "onnx==1.23.2" "onnxruntime==1.32.0"
	touch $@

# MMDetection 3.3 for the tests that compare with its models: pure-Python wheels in a folder of
# their own, which those tests append to the import path, next to the project's torch (mmdet
# refuses mmcv 2.2; mmcv-lite has no compiled ops, the tests stand in for them)
MMDETECTION_DIR := $(VENV)/mmdetection
$(STAMPS)/mmdetection: $(STAMPS)/venv
	$(PIP) install --target $(MMDETECTION_DIR) --no-deps --upgrade mmdet==3.3.0 mmengine==0.10.7 \
		mmcv-lite==2.1.0 addict yapf terminaltables shapely termcolor rich markdown-it-py mdurl pygments six
	touch $@

# transformers 5 and timm for the tests that compare with its models, in their own folder as
# MMDetection (the numpy transformers brings is removed: the project's stays in force)
TRANSFORMERS_DIR := $(VENV)/transformers
$(STAMPS)/transformers: $(STAMPS)/venv
	$(PIP) install --target $(TRANSFORMERS_DIR) --upgrade transformers==5.23.0
	$(PIP) install --target $(TRANSFORMERS_DIR) --no-deps --upgrade timm==1.0.31
	rm -rf $(TRANSFORMERS_DIR)/numpy $(TRANSFORMERS_DIR)/numpy.libs $(TRANSFORMERS_DIR)/numpy-*.dist-info
	touch $@

$(STAMPS)/project: $(STAMPS)/detectron2 $(STAMPS)/test-deps setup.py $(wildcard csrc/*.* csrc/*/*.*)
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --no-build-isolation -e .
	touch $@

demo: setup
	$(PY) -m conditional_detr.tools.shapes_demo --output-dir output/demo

# the same on the panoptic shapes: a mask head, PQ / SQ / RQ and mask AP (docs/segmentation.md)
panoptic-demo: setup
	$(PY) -m conditional_detr.tools.shapes_demo --output-dir output/panoptic_demo \
		--box-stage configs/quick_schedules/deformable_detr_panoptic_shapes_boxes.yaml \
		--config-file configs/quick_schedules/deformable_detr_panoptic_shapes.yaml

test: setup $(STAMPS)/mmdetection $(STAMPS)/transformers
	$(PY) -m pytest -q tests

# the quick loop while working: everything but the tests marked slow (see tests/README.md)
test-fast: setup $(STAMPS)/mmdetection $(STAMPS)/transformers
	$(PY) -m pytest -q -m "not slow" tests

clean-build:
	rm -rf build conditional_detr/_C*.so $(STAMPS)/project
