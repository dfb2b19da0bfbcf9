"""
`conditional-detr://NAME` in MODEL.WEIGHTS (or anywhere detectron2's PathManager opens a
file): the official checkpoint NAME, downloaded once, converted to this project's format
and cached as `$CONDITIONAL_DETR_CACHE/NAME.pth` (default: iopath's cache directory,
`$FVCORE_CACHE` or ~/.torch/iopath_cache, under conditional_detr/).
"""

import logging
import os
import tempfile
from urllib.parse import urlparse

import torch
from iopath.common.file_io import PathHandler, file_lock, get_cache_dir

from . import formats
from .catalog import SCHEME, official_checkpoint
from .official import convert_torchvision_resnet


logger = logging.getLogger(__name__)


def cache_dir():
    return os.environ.get("CONDITIONAL_DETR_CACHE") or os.path.join(
        get_cache_dir(), "conditional_detr"
    )


def download_url(url, destination, sha256_prefix=None):
    """Download `url` to `destination`, checking the SHA-256 prefix when given."""
    torch.hub.download_url_to_file(url, destination, hash_prefix=sha256_prefix)


class OfficialCheckpointHandler(PathHandler):
    """
    Resolves `conditional-detr://NAME` to a local checkpoint of this project. The official
    file (and its companions, such as transformers' config.json) is downloaded (by
    `download(url, destination, sha256_prefix)`), converted to its entry's classes (80, or
    COCO panoptic's 133) by its format (`formats.py`), with their names, and written
    atomically to the
    cache; the download itself is not kept. A file the user saved as
    `<cache>/official/NAME.pth` is used instead of downloading: the way to use the
    checkpoints published only as share pages.
    """

    def __init__(self, download=download_url):
        super().__init__()
        self.download = download

    def _get_supported_prefixes(self):
        return [SCHEME]

    def _get_local_path(self, path, force=False, **kwargs):
        self._check_kwargs(kwargs)
        name = path[len(SCHEME) :]
        official_checkpoint(name)  # an unknown name fails before touching the cache
        converted_path = os.path.join(cache_dir(), name + ".pth")
        if os.path.isfile(converted_path) and not force:
            return converted_path
        os.makedirs(os.path.dirname(converted_path), exist_ok=True)
        # the processes of a multi-GPU run all ask for the file: one converts, the others wait
        with file_lock(converted_path):
            if force or not os.path.isfile(converted_path):
                self._convert_into_cache(name, converted_path)
        return converted_path

    def _open(self, path, mode="r", buffering=-1, **kwargs):
        self._check_kwargs(kwargs)
        if mode not in ("r", "rb"):
            raise ValueError(f"{path} is read-only, cannot open it with mode {mode!r}")
        return open(self._get_local_path(path), "rb", buffering=buffering)

    def _convert_into_cache(self, name, converted_path):
        saved_by_user = os.path.join(cache_dir(), "official", name + ".pth")
        if os.path.isfile(saved_by_user):
            source_format, state_dict = self._read(name, saved_by_user)
        else:
            with tempfile.TemporaryDirectory(
                dir=cache_dir(), prefix=f".{os.path.basename(name)}.download."
            ) as folder:
                downloaded = self._download(name, folder, saved_by_user)
                source_format, state_dict = self._read(name, downloaded)
        try:
            converted = self._convert(name, source_format, state_dict)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{SCHEME}{name}: cannot convert the official checkpoint: {e}") from e
        checkpoint = {"model": converted, "matching_heuristics": False}
        if source_format is not None:  # a detector's: its classes' names, for match_names
            class_names = source_format.class_names(official_checkpoint(name).num_classes)
            if class_names is not None:
                checkpoint["class_names"] = list(class_names)
        _save_atomically(checkpoint, converted_path)
        logger.info(f"Cached {SCHEME}{name} at {converted_path}")

    @staticmethod
    def _convert(name, source_format, state_dict):
        if source_format is None:  # a torchvision ResNet
            return convert_torchvision_resnet(state_dict)
        return source_format.convert(state_dict, official_checkpoint(name).num_classes)

    def _download(self, name, folder, saved_by_user):
        checkpoint = official_checkpoint(name)
        if checkpoint.url is None:
            raise RuntimeError(
                f"{SCHEME}{name} is published only as a share page, which needs a browser: "
                f"{checkpoint.page} . Download it there and save it as {saved_by_user}; it is "
                "converted and cached on first use"
            )
        destination = os.path.join(folder, os.path.basename(urlparse(checkpoint.url).path))
        base_url = checkpoint.url.rsplit("/", 1)[0]
        downloads = [(checkpoint.url, destination, checkpoint.sha256_prefix)] + [
            (f"{base_url}/{companion}", os.path.join(folder, companion), None) for companion in checkpoint.companions
        ]
        for url, path, sha256_prefix in downloads:
            logger.info(f"Downloading {SCHEME}{name} from {url} ...")
            try:
                self.download(url, path, sha256_prefix)
            except Exception as e:
                raise RuntimeError(f"{SCHEME}{name}: downloading {url} failed ({e}); nothing was cached") from e
        return destination

    @staticmethod
    def _read(name, path):
        """The file's format of `formats.py` (None for a torchvision ResNet) and its state dict."""
        try:
            if official_checkpoint(name).kind == "torchvision-resnet":
                return None, torch.load(path, map_location="cpu", weights_only=True)
            return formats.load(path)
        except ValueError as e:  # a model the project cannot represent
            raise ValueError(f"{SCHEME}{name}: {e}; nothing was cached") from e
        except Exception as e:
            raise RuntimeError(
                f"{SCHEME}{name}: {path} is not a readable official checkpoint (a broken or "
                f"truncated download?): {e}; nothing was cached"
            ) from e


def _save_atomically(obj, path):
    """Write next to `path`, then rename: a killed run never leaves a partial `path`."""
    handle, partial = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(obj, f)
        os.chmod(partial, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(partial, path)
    except BaseException:
        os.unlink(partial)
        raise
