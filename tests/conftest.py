"""Shared fixtures: an isolated cache folder, the offline backbone, and Fashion-MNIST."""

import os

import pytest
import torch

# xdist workers share the cores, one thread each, and so do the commands and kernels the tests start.
# `make test` sets OMP_NUM_THREADS=1 before Python starts; this covers a bare `pytest -n N`.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The tests marked slow first, in their order: pytest-xdist hands tests out in collection order, and a
    long test collected late (the miniature, about a third of the suite's wall time) leaves one worker
    running it alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """$SFM_CACHE points at one temporary folder for the whole session (never ~/.cache/sfm_lib), and
    $SFM_DATA is unset. Session-scoped so the session fixtures below (which may call cache_dir()) see it too."""
    path = tmp_path_factory.mktemp("sfm_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFM_CACHE", str(path))
        mp.delenv("SFM_DATA", raising=False)
        yield path


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, session_cache):
    """Per test: re-assert the session cache (a test's own monkeypatch is undone after it)."""
    monkeypatch.setenv("SFM_CACHE", str(session_cache))
    monkeypatch.delenv("SFM_DATA", raising=False)


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty cache folder private to one test (for tests that check what gets written there)."""
    path = tmp_path / "cache"
    path.mkdir()
    monkeypatch.setenv("SFM_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def lite0(session_cache):
    """The frozen EfficientNet-Lite0 backbone (CPU), loaded once."""
    from sfm_lib import backbones

    return backbones.load("effnet_lite0")


@pytest.fixture(scope="session")
def fmnist_train(session_cache):
    from sfm_lib import data

    return data.load("fashion_mnist", "train")


@pytest.fixture(scope="session")
def fmnist_test(session_cache):
    from sfm_lib import data

    return data.load("fashion_mnist", "test")


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's forward passes on one intra-op thread, then restore the setting.

    On a 2-core machine shared with other work, two spinning OpenMP threads make small forward passes up to
    ~50x slower (0.5 s instead of 6 ms for one image at 32 px); one thread is never much slower here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_fmnist_dir(tmp_path_factory):
    """A folder of Fashion-MNIST idx files cut to 30 train / 10 test images per class (for $SFM_DATA), so
    command-line runs over whole splits stay fast."""
    import gzip
    import struct

    from sfm_lib import data

    folder = tmp_path_factory.mktemp("tiny_fmnist")
    for split, prefix, n in [("train", "train", 30), ("test", "t10k", 10)]:
        ds = data.load("fashion_mnist", split)
        idx = data.subset_per_class(ds, n).indices
        images, labels = ds.images[idx], ds.targets[idx].to(torch.uint8)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBBIII", 0, 8, 3, len(idx), 28, 28) + images.numpy().tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBBI", 0, 8, 1, len(idx)) + labels.numpy().tobytes())
    return folder
