"""Fixtures shared by the test modules; what they import lives in `helpers/`."""
import os
import shutil
import sys

import pytest
import torch
from detectron2.data import DatasetCatalog

from helpers.paths import REPO
from helpers.training import register_tiny_shapes

sys.path.insert(0, REPO)  # train_net.py is a script at the top of the repository


@pytest.fixture(scope="module")
def one_thread():
    """
    One torch thread for a module of tiny-model tests: fastest for them, and robust to
    other processes on the cores. Opt in with `pytestmark = pytest.mark.usefixtures(...)`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_folder(tmp_path_factory):
    """
    Makes folders for the files a module's tests share (checkpoints, datasets) and removes
    them after the module's last test: kept for the whole run they would add up to GBs.
    """
    folders = []

    def make(name):
        folders.append(tmp_path_factory.mktemp(name))
        return folders[-1]

    yield make
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def shapes_root(module_folder):
    """A tiny copy of the embedded shapes dataset, drawn once per module and registered."""
    root = str(module_folder("datasets") / "shapes")
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = os.path.dirname(root)
    register_tiny_shapes(root)
    DatasetCatalog.get("shapes_train"), DatasetCatalog.get("shapes_val")  # draw them now
    yield root
    if old is None:
        os.environ.pop("DETECTRON2_DATASETS", None)
    else:
        os.environ["DETECTRON2_DATASETS"] = old


@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving the files of a folder, and the folder."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()
