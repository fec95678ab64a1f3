"""Datasets: Fashion-MNIST from idx files, root/$SFM_DATA look-up, errors, image folders, per-class subsets."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfm_lib import data

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _idx_numpy(path: Path) -> np.ndarray:
    """Independent idx reader: magic = two zero bytes, type code, ndim; then ndim big-endian uint32 dims."""
    raw = gzip.decompress(path.read_bytes())
    assert raw[0] == 0 and raw[1] == 0 and raw[2] == 0x08
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    assert body.size == int(np.prod(dims))
    return body.reshape(dims)


@pytest.fixture(scope="module")
def raw_test_images():
    return _idx_numpy(DEBIAN / "t10k-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def raw_test_labels():
    return _idx_numpy(DEBIAN / "t10k-labels-idx1-ubyte.gz")


# ----------------------------------------------------------------------------------------- Fashion-MNIST
def test_fashion_mnist_sizes_and_classes(fmnist_train, fmnist_test):
    assert len(fmnist_train) == 54000  # the published 60000 less the 10 % validation hold-out
    assert len(fmnist_test) == 10000
    assert fmnist_train.classes == fmnist_test.classes
    assert len(fmnist_test.classes) == 10
    assert fmnist_test.classes[0] == "T-shirt/top" and fmnist_test.classes[9] == "Ankle boot"
    assert fmnist_test.targets.dtype == torch.long
    assert torch.bincount(fmnist_test.targets, minlength=10).tolist() == [1000] * 10
    assert torch.bincount(fmnist_train.targets, minlength=10).tolist() == [5400] * 10
    assert fmnist_train.split == "train" and fmnist_test.split == "test"
    assert fmnist_test.name == "fashion_mnist"


def test_fashion_mnist_items_match_raw_bytes(fmnist_test, raw_test_images, raw_test_labels):
    assert raw_test_images.shape == (10000, 28, 28)
    assert torch.equal(fmnist_test.targets, torch.from_numpy(raw_test_labels.astype(np.int64)))
    for i in (0, 1, 4321, 9999):
        img, label = fmnist_test[i]
        assert img.dtype == torch.float32 and img.shape == (3, 28, 28)
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
        expected = torch.from_numpy(raw_test_images[i].astype(np.float32) / np.float32(255.0))
        torch.testing.assert_close(img[0], expected, rtol=0, atol=1e-7)
        assert label == int(raw_test_labels[i])
    # The data set is not blank: some pixel is fully on and some fully off.
    img0 = fmnist_test[0][0]
    assert img0.max() == 1.0 and img0.min() == 0.0


def test_fashion_mnist_train_item_matches_raw_bytes():
    # Only the head of the train file: header + the first two images (of the published split, "trainval").
    whole = data.load("fashion_mnist", "trainval")
    with gzip.open(DEBIAN / "train-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read(16 + 2 * 784)
    assert raw[:4] == b"\x00\x00\x08\x03"
    assert [int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(3)] == [60000, 28, 28]
    second = torch.tensor(list(raw[16 + 784:16 + 2 * 784]), dtype=torch.float32).view(28, 28) / 255.0
    torch.testing.assert_close(whole[1][0][2], second, rtol=0, atol=1e-7)


def test_batch_equals_stacked_items(fmnist_test):
    idx = torch.tensor([5, 0, 9999, 17, 5])
    imgs, labels = fmnist_test.batch(idx)
    assert imgs.shape == (5, 3, 28, 28) and imgs.dtype == torch.float32
    items = [fmnist_test[int(i)] for i in idx]
    assert torch.equal(imgs, torch.stack([x for x, _ in items]))
    assert labels.tolist() == [y for _, y in items]
    # The batch must not alias the stored bytes (div_ on a view would corrupt the dataset).
    imgs.zero_()
    assert torch.equal(fmnist_test[5][0], items[0][0])


def test_tensor_dataset_colour_items():
    images = torch.randint(0, 256, (4, 5, 6, 3), dtype=torch.uint8)
    ds = data.TensorImageDataset(images, [0, 1, 1, 0], ["a", "b"], "tiny")
    img, label = ds[2]
    assert img.shape == (3, 5, 6) and label == 1
    assert torch.equal(img, images[2].permute(2, 0, 1).float() / 255)
    assert torch.equal(ds.batch(torch.tensor([2]))[0][0], img)
    with pytest.raises(ValueError, match="uint8"):
        data.TensorImageDataset(images.float(), [0, 1, 1, 0], ["a", "b"], "tiny")
    with pytest.raises(ValueError, match="labels"):
        data.TensorImageDataset(images, [0, 1], ["a", "b"], "tiny")


# ----------------------------------------------------------------------------------- root= and $SFM_DATA
@pytest.fixture
def test_split_copy(tmp_path):
    folder = tmp_path / "fm"
    folder.mkdir()
    for f in TEST_FILES:
        shutil.copy(DEBIAN / f, folder / f)
    return folder


def test_load_from_root(test_split_copy, monkeypatch, fmnist_test, tmp_path):
    # With the Debian folder hidden, the copy is the only place the files can come from.
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    ds = data.load("fashion_mnist", "test", root=str(test_split_copy))
    assert len(ds) == 10000
    assert torch.equal(ds.images, fmnist_test.images)
    assert torch.equal(ds.targets, fmnist_test.targets)


def test_load_from_sfm_data_env(test_split_copy, monkeypatch, fmnist_test, tmp_path):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    # torchvision's layout under $SFM_DATA is found too.
    tv = tmp_path / "tv" / "FashionMNIST" / "raw"
    tv.mkdir(parents=True)
    for f in TEST_FILES:
        shutil.copy(test_split_copy / f, tv / f)
    for folder in (test_split_copy, tmp_path / "tv"):
        monkeypatch.setenv("SFM_DATA", str(folder))
        ds = data.load("fashion_mnist", "test")
        assert len(ds) == 10000
        assert torch.equal(ds.targets, fmnist_test.targets)


def test_uncompressed_idx_files_are_read(tmp_path, monkeypatch, fmnist_test):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    for f in TEST_FILES:
        (tmp_path / f[:-3]).write_bytes(gzip.decompress((DEBIAN / f).read_bytes()))
    ds = data.load("fashion_mnist", "test", root=str(tmp_path))
    assert torch.equal(ds.images, fmnist_test.images)


def test_truncated_idx_raises_value_error(test_split_copy, monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    labels = test_split_copy / TEST_FILES[1]
    raw = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(raw[:-10]))  # a valid gzip stream holding a short idx body
    with pytest.raises(ValueError, match="truncated"):
        data.load("fashion_mnist", "test", root=str(test_split_copy))


def test_not_an_idx_file_raises_value_error(tmp_path):
    bad = tmp_path / "bad-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"\x00" * 12))  # float type
    with pytest.raises(ValueError, match="idx"):
        data._read_idx(bad)


def test_truncated_gzip_raises_value_error(tmp_path):
    part = tmp_path / TEST_FILES[1]
    raw = (DEBIAN / TEST_FILES[1]).read_bytes()
    part.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match=part.name):
        data._read_idx(part)


# -------------------------------------------------------------------------------------------- missing data
def test_missing_fashion_mnist_names_every_folder(tmp_path, monkeypatch):
    empty, cache, sfm_data = tmp_path / "empty", tmp_path / "cache", tmp_path / "sfm_data"
    for p in (empty, cache, sfm_data):
        p.mkdir()
    nowhere = tmp_path / "no-debian-here"
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", nowhere)
    monkeypatch.setenv("SFM_CACHE", str(cache))
    monkeypatch.setenv("SFM_DATA", str(sfm_data))
    with pytest.raises(FileNotFoundError) as info:
        data.load("fashion_mnist", "test", root=str(empty))
    msg = str(info.value)
    for folder in (empty, empty / "fashion-mnist", empty / "FashionMNIST" / "raw",
                   sfm_data, sfm_data / "fashion-mnist", nowhere, cache / "data" / "FashionMNIST" / "raw"):
        assert str(folder) in msg, (folder, msg)
    assert "t10k-images-idx3-ubyte" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "download=True" in msg


def test_missing_mnist_mentions_download(tmp_path, fresh_cache):
    with pytest.raises(FileNotFoundError, match="download=True") as info:
        data.load("mnist", "train", root=str(tmp_path))
    assert "apt-get" not in str(info.value)  # the Debian hint is for Fashion-MNIST only


def test_unknown_name_lists_names():
    with pytest.raises(ValueError) as info:
        data.load("imagenet_tiny", "train")
    msg = str(info.value)
    assert "imagenet_tiny" in msg
    for name in ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder:PATH"):
        assert name in msg


@pytest.mark.parametrize("split", ["validation", "TRAIN", ""])
def test_bad_split(split):
    with pytest.raises(ValueError, match="split"):
        data.load("fashion_mnist", split)


# ------------------------------------------------------------------------------------------ validation split
def _expected_holdout(labels: np.ndarray, ids: list[str], fraction: float = 0.1) -> list[int]:
    """Independent: per class, the round(fraction · n_c) items of least SHA-256("sfm-val-v1:<class>:<id>")."""
    import hashlib
    import math

    out = []
    for c in sorted(set(labels.tolist())):
        members = [i for i in range(len(labels)) if labels[i] == c]
        k = math.floor(fraction * len(members) + 0.5)
        out += sorted(members, key=lambda i: hashlib.sha256(f"sfm-val-v1:{c}:{ids[i]}".encode()).hexdigest())[:k]
    return sorted(out)


def test_val_split_holds_out_ten_percent_of_each_class_and_train_keeps_the_rest(fmnist_train):
    raw_images = _idx_numpy(DEBIAN / "train-images-idx3-ubyte.gz")
    raw_labels = _idx_numpy(DEBIAN / "train-labels-idx1-ubyte.gz").astype(np.int64)
    held = _expected_holdout(raw_labels, [str(i) for i in range(len(raw_labels))])
    rest = sorted(set(range(len(raw_labels))) - set(held))
    val = data.load("fashion_mnist", "val")
    assert val.split == "val" and len(val) == 6000 and val.targets.bincount().tolist() == [600] * 10
    assert np.array_equal(val.images.numpy(), raw_images[held]) and val.targets.tolist() == raw_labels[held].tolist()
    assert np.array_equal(fmnist_train.images.numpy(), raw_images[rest])
    assert fmnist_train.targets.tolist() == raw_labels[rest].tolist()
    again = data.load("fashion_mnist", "val")  # fixed: the same images on every load
    assert torch.equal(again.images, val.images)
    whole = data.load("fashion_mnist", "trainval")
    assert whole.split == "trainval" and np.array_equal(whole.images.numpy(), raw_images)


def test_the_splits_are_told_apart_by_every_cache_key(fmnist_train):
    from sfm_lib import cache, features

    splits = [fmnist_train, data.load("fashion_mnist", "val"), data.load("fashion_mnist", "trainval")]
    for keyed in (features.dataset_key, data.fingerprint, lambda d: cache.key("features", dataset=d)):
        assert len({keyed(d) for d in splits}) == 3
    # same split, same key: a second load is a cache hit
    assert cache.key("features", dataset=data.load("fashion_mnist", "val")) == cache.key("features", dataset=splits[1])


def _png_folder(root: Path, counts: dict[str, int], split: str = "train") -> None:
    for cls, n in counts.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((2, 3), i, dtype=np.uint8)).save(root / split / cls / f"{cls}{i:02d}.png")


def test_imagefolder_val_is_a_per_class_holdout_by_file_name(tmp_path):
    root = tmp_path / "f"
    _png_folder(root, {"a": 12, "b": 25, "c": 4})  # 10 %: 1, 3 (2.5 rounds up) and 0 images
    whole = data.load(f"imagefolder:{root}", "trainval")
    ids = [p.relative_to(root / "train").as_posix() for p in whole.files]
    held = _expected_holdout(whole.targets.numpy(), ids)
    val, train = data.load(f"imagefolder:{root}", "val"), data.load(f"imagefolder:{root}", "train")
    assert val.files == [whole.files[i] for i in held] and val.targets.bincount(minlength=3).tolist() == [1, 3, 0]
    assert train.files == [f for i, f in enumerate(whole.files) if i not in held]
    assert train.targets.tolist() == [whole.targets[i].item() for i in range(len(whole)) if i not in held]
    assert train.classes == val.classes == ["a", "b", "c"] and (train.split, val.split) == ("train", "val")
    assert data.fingerprint(train) != data.fingerprint(whole)
    # a file added to class b moves no other file of the hold-out out of it
    _png_folder(root, {"b": 26})
    assert set(val.files) <= set(data.load(f"imagefolder:{root}", "val").files) | {root / "train/b/b25.png"}


def test_imagefolder_with_a_val_folder_uses_it_and_keeps_train_whole(tmp_path):
    root = tmp_path / "f"
    _png_folder(root, {"a": 12, "b": 6})
    _png_folder(root, {"b": 2}, split="val")
    val, train = data.load(f"imagefolder:{root}", "val"), data.load(f"imagefolder:{root}", "train")
    assert [p.name for p in val.files] == ["b00.png", "b01.png"] and val.targets.tolist() == [1, 1]
    assert len(train) == 18 and train.files == data.load(f"imagefolder:{root}", "trainval").files


def test_an_empty_holdout_is_refused_in_one_line(tmp_path):
    root = tmp_path / "f"
    _png_folder(root, {"a": 4, "b": 2})
    assert len(data.load(f"imagefolder:{root}", "train")) == 6  # nothing held out
    with pytest.raises(ValueError, match="val split is empty; add a val/<class>/ folder") as info:
        data.load(f"imagefolder:{root}", "val")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="fraction"):
        data.holdout_indices(torch.zeros(3), ["0", "1", "2"], fraction=1.0)
    with pytest.raises(ValueError, match="2 item ids for 3 labels"):
        data.holdout_indices(torch.zeros(3), ["0", "1"])


# --------------------------------------------------------------------------------------------- imagefolder
@pytest.fixture
def image_folder(tmp_path):
    """train/{cat,ant,bee} and test/{cat,ant,bee} with PNG (RGB + one grey) and JPEG files of mixed sizes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    arrays = {}
    layout = {
        "train": {"cat": [("c1.png", (7, 9), "RGB"), ("c0.jpg", (16, 12), "RGB")],
                  "ant": [("a0.png", (5, 5), "L"), ("a1.PNG", (6, 4), "RGB"), ("notes.txt", None, None)],
                  "bee": [("b0.jpeg", (10, 10), "RGB")]},
        "test": {"cat": [("t0.png", (8, 8), "RGB")], "ant": [], "bee": [("t1.png", (3, 11), "L")]},
    }
    for split, classes in layout.items():
        for cls, files in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for fname, size, mode in files:
                if size is None:
                    (folder / fname).write_text("not an image")
                    continue
                h, w = size
                if mode == "L":
                    arr = rng.integers(0, 256, (h, w), dtype=np.uint8)
                else:
                    # Smooth content, so the JPEG round trip stays close.
                    yy, xx = np.mgrid[0:h, 0:w]
                    arr = np.stack([(yy * 255 // max(h - 1, 1)), (xx * 255 // max(w - 1, 1)),
                                    np.full_like(yy, 128)], -1).astype(np.uint8)
                    if fname.lower().endswith(".png"):
                        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                kw = {"quality": 95} if fname.lower().endswith((".jpg", ".jpeg")) else {}
                Image.fromarray(arr).save(folder / fname, **kw)
                arrays[(split, cls, fname)] = arr
    return root, arrays


def test_imagefolder_train(image_folder):
    root, arrays = image_folder
    ds = data.load(f"imagefolder:{root}", "train")
    assert ds.classes == ["ant", "bee", "cat"]
    assert ds.split == "train" and ds.name == f"imagefolder:{root}"
    names = [p.name for p in ds.files]
    assert sorted(names) == sorted(["a0.png", "a1.PNG", "b0.jpeg", "c0.jpg", "c1.png"])
    assert len(ds) == 5
    for i, path in enumerate(ds.files):
        img, label = ds[i]
        cls = path.parent.name
        assert label == ds.classes.index(cls) == int(ds.targets[i])
        arr = arrays[("train", cls, path.name)]
        h, w = arr.shape[:2]
        assert img.shape == (3, h, w) and img.dtype == torch.float32
        if path.suffix.lower() == ".png":
            ref = torch.from_numpy(arr).float() / 255.0
            if arr.ndim == 2:
                for ch in range(3):
                    assert torch.equal(img[ch], ref)
            else:
                assert torch.equal(img, ref.permute(2, 0, 1))
        else:
            ref = torch.from_numpy(arr).float().permute(2, 0, 1) / 255.0
            assert (img - ref).abs().mean() < 0.03
    assert ds.targets.tolist() == sorted(ds.targets.tolist())


def test_imagefolder_test_split_uses_train_classes(image_folder):
    root, arrays = image_folder
    ds = data.load(f"imagefolder:{root}", "test")
    assert ds.classes == ["ant", "bee", "cat"]  # "ant" has no test image but keeps its index
    assert ds.targets.tolist() == [1, 2]
    grey, label = ds[0]
    assert label == 1
    ref = torch.from_numpy(arrays[("test", "bee", "t1.png")]).float() / 255.0
    assert grey.shape == (3, 3, 11)
    assert all(torch.equal(grey[c], ref) for c in range(3))


def test_imagefolder_missing_split(image_folder):
    root, _ = image_folder
    shutil.rmtree(root / "test")
    with pytest.raises(FileNotFoundError) as info:
        data.load(f"imagefolder:{root}", "test")
    msg = str(info.value)
    assert str(root / "test") in msg
    assert f"{root}/train/<class>/" in msg and f"{root}/test/<class>/" in msg


def test_imagefolder_without_images(tmp_path):
    (tmp_path / "train" / "x").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        data.load(f"imagefolder:{tmp_path}", "train")


# ---------------------------------------------------------------------------------------- subset_per_class
def test_subset_per_class(fmnist_test):
    sub = data.subset_per_class(fmnist_test, 4)
    assert len(sub) == 40
    assert torch.bincount(sub.targets, minlength=10).tolist() == [4] * 10
    # Without a seed: the first 4 of each class, in dataset order.
    expected = sorted(i for c in range(10)
                      for i in torch.nonzero(fmnist_test.targets == c).flatten()[:4].tolist())
    assert sub.indices == expected
    assert data.subset_per_class(fmnist_test, 4).indices == sub.indices
    # .targets agrees with the items; class names and name carry over.
    assert [sub[j][1] for j in range(len(sub))] == sub.targets.tolist()
    assert sub.classes == fmnist_test.classes and sub.name == fmnist_test.name
    assert torch.equal(sub[3][0], fmnist_test[sub.indices[3]][0])


def test_subset_per_class_seeds(fmnist_test):
    a = data.subset_per_class(fmnist_test, 5, seed=1)
    b = data.subset_per_class(fmnist_test, 5, seed=1)
    c = data.subset_per_class(fmnist_test, 5, seed=2)
    assert a.indices == b.indices
    assert a.indices != c.indices
    assert a.indices != data.subset_per_class(fmnist_test, 5).indices
    for s in (a, c):
        assert torch.bincount(s.targets, minlength=10).tolist() == [5] * 10
        assert len(set(s.indices)) == 50
        assert torch.equal(s.targets, fmnist_test.targets[s.indices])
        assert [s[j][1] for j in range(len(s))] == s.targets.tolist()


def test_subset_per_class_more_than_available():
    images = torch.zeros(5, 2, 2, dtype=torch.uint8)
    ds = data.TensorImageDataset(images, [0, 0, 1, 1, 1], ["a", "b"], "tiny")
    sub = data.subset_per_class(ds, 3, seed=0)
    assert torch.bincount(sub.targets).tolist() == [2, 3]


# ------------------------------------------------------------------------------- odd modes, unreadable files
def _odd_folder(root: Path) -> dict:
    """train/{a,b}, test/{a,b}: RGB, grey, CMYK JPEG, RGBA, palette and 16-bit grey PNGs of mixed sizes,
    and one text file named .png (train/b/bad.png). Returns the expected uint8 RGB arrays by file name
    (None for the bad file; the CMYK JPEG's entry is its RGB source, matched approximately)."""
    rng = np.random.default_rng(3)
    expected = {}
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
    a, b = root / "train" / "a", root / "train" / "b"
    rgb = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(a / "rgb.png")
    expected["rgb.png"] = rgb
    grey = rng.integers(0, 256, (10, 7), dtype=np.uint8)
    Image.fromarray(grey).save(a / "grey.png")
    expected["grey.png"] = np.repeat(grey[:, :, None], 3, 2)
    yy, xx = np.mgrid[0:16, 0:20]  # smooth colours survive the JPEG round trip
    smooth = np.stack([yy * 15, xx * 12, np.full_like(yy, 90)], -1).astype(np.uint8)
    Image.fromarray(smooth).convert("CMYK").save(a / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = smooth
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(a / "rgba.png")
    expected["rgba.png"] = rgba[:, :, :3]
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (11, 9), dtype=np.uint8)
    pal = Image.fromarray(index, "P")
    pal.putpalette(palette.flatten().tolist())
    pal.save(b / "pal.png")
    expected["pal.png"] = palette[index]
    deep = rng.integers(0, 65536, (6, 6), dtype=np.uint16)
    Image.fromarray(deep).save(b / "deep.png")
    expected["deep.png"] = np.repeat(np.floor(deep.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)[:, :, None],
                                     3, 2)
    (b / "bad.png").write_text("this is a text file, not an image")
    expected["bad.png"] = None
    for split, cls in (("test", "a"), ("test", "b")):
        Image.fromarray(rgb).save(root / split / cls / "t.png")
    return expected


@pytest.fixture
def odd_folder(tmp_path):
    root = tmp_path / "odd"
    return root, _odd_folder(root)


def test_imagefolder_converts_every_mode_to_rgb(odd_folder):
    root, expected = odd_folder
    ds = data.load(f"imagefolder:{root}", "train")
    assert Image.open(root / "train" / "a" / "cmyk.jpg").mode == "CMYK"
    assert Image.open(root / "train" / "b" / "pal.png").mode == "P"
    assert Image.open(root / "train" / "b" / "deep.png").mode.startswith("I")
    for i, path in enumerate(ds.files):
        want = expected[path.name]
        if want is None:
            continue
        img = ds.read_uint8(i)
        assert img.dtype == torch.uint8 and img.shape == (3, *want.shape[:2]), path.name
        ref = torch.from_numpy(want).permute(2, 0, 1)
        if path.suffix == ".jpg":
            assert (img.float() - ref.float()).abs().mean() < 6, path.name
        else:
            assert torch.equal(img, ref), path.name
        item, label = ds[i]
        assert torch.equal(item, img.float() / 255) and label == ds.classes.index(path.parent.name)


def test_unreadable_file_is_named_in_one_line(odd_folder):
    root, _ = odd_folder
    ds = data.load(f"imagefolder:{root}", "train")
    i = [p.name for p in ds.files].index("bad.png")
    with pytest.raises(data.BadImageError) as info:
        ds[i]
    msg = str(info.value)
    assert msg.startswith(str(root / "train" / "b" / "bad.png")) and "UnidentifiedImageError" in msg
    assert "\n" not in msg
    assert isinstance(info.value, ValueError)


def test_fingerprint_covers_the_items_before_a_position(odd_folder):
    root, _ = odd_folder
    ds = data.load(f"imagefolder:{root}", "train")
    names = [p.name for p in ds.files]
    last = names.index("rgb.png")  # class a is listed first: cmyk, grey, rgb, rgba, then class b
    before = data.fingerprint(ds, last + 1)
    assert before != data.fingerprint(ds, last) and data.fingerprint(ds) == data.fingerprint(ds, len(ds))
    assert data.Fingerprint(ds).advance(1).advance(last + 1).hexdigest() == before  # grown in steps: the same
    sub = data.subset(ds, [0, 2, 1])
    assert data.fingerprint(sub, 2) != data.fingerprint(data.subset(ds, [0, 1, 2]), 2)
    (root / "train" / "b" / "bad.png").unlink()  # a file after the position: the prefix is unchanged
    assert data.fingerprint(data.load(f"imagefolder:{root}", "train"), last + 1) == before
    (root / "train" / "a" / "grey.png").unlink()  # a file before it: changed
    assert data.fingerprint(data.load(f"imagefolder:{root}", "train"), last + 1) != before


@pytest.mark.usefixtures("single_thread")
def test_feature_pass_stops_at_or_skips_unreadable_files(odd_folder, lite0):
    from sfm_lib import features

    root, expected = odd_folder
    ds = data.load(f"imagefolder:{root}", "train")
    with pytest.raises(data.BadImageError, match=r"bad\.png.*skip_bad=True \(--skip-bad\)"):
        list(features.iterate(lite0, ds, 32, batch_size=3, num_workers=0, progress=False))
    for workers in (0, 2):  # the message crosses from a worker process in one line, no worker traceback
        with pytest.raises(data.BadImageError) as info:
            list(features.iterate(lite0, ds, 32, batch_size=3, num_workers=workers, progress=False))
        assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    skipped = []
    out = list(features.iterate(lite0, ds, 32, batch_size=3, num_workers=0, progress=False, skip_bad=True,
                                skipped=skipped))
    assert skipped == [str(root / "train" / "b" / "bad.png")]
    labels = torch.cat([y for _, y in out])
    good = [i for i, p in enumerate(ds.files) if p.name != "bad.png"]
    assert torch.equal(labels, ds.targets[good])
    # the dataset's own flag does the same (data.load(..., skip_bad=True))
    flagged = data.load(f"imagefolder:{root}", "train", skip_bad=True)
    assert sum(len(y) for _, y in features.iterate(lite0, flagged, 32, batch_size=4, progress=False,
                                                     num_workers=0)) == len(good)


@pytest.mark.usefixtures("single_thread")
def test_uint8_pipeline_matches_the_float_path(odd_folder, lite0):
    # Reference, per image: float [0,1] → centre square crop → bilinear resize in float → φ. The pipeline
    # decodes to uint8 in the workers and resizes there, on the CPU and for CUDA alike.
    from sfm_lib import backbones, features

    root, _ = odd_folder
    ds = data.load(f"imagefolder:{root}", "train", skip_bad=True)
    good = [i for i, p in enumerate(ds.files) if p.name != "bad.png"]
    with torch.no_grad():
        ref = torch.cat([lite0.features(backbones.square_resize(ds[i][0], 32)[None], 32) for i in good])
    got, labels = features.compute(lite0, ds, 32, batch_size=4, num_workers=2, cache=False, progress=False)
    assert torch.equal(labels, ds.targets[good])
    # Equal up to the cache's float16 rounding (and batch-vs-single float32 sums); rounding the resized
    # images to uint8 would be off by up to 6e-2 here, unrelated images by ~1.
    torch.testing.assert_close(got, ref.half().float(), rtol=2e-3, atol=2e-3)


@pytest.mark.usefixtures("single_thread")
def test_statistics_record_skipped_files(odd_folder, lite0):
    from sfm_lib import stats

    root, _ = odd_folder
    ds = data.load(f"imagefolder:{root}", "train")
    with pytest.raises(data.BadImageError, match="bad.png"):
        stats.extract(lite0, ds, 32, batch_size=3, num_workers=0, progress=False)
    st = stats.extract(lite0, ds, 32, batch_size=3, num_workers=0, progress=False, skip_bad=True)
    assert st.meta["num_skipped"] == 1 and st.meta["skipped"] == [str(root / "train" / "b" / "bad.png")]
    assert st.counts.tolist() == [4, 2]
    (root / "train" / "b" / "bad.png").unlink()  # the same statistics as a folder without the file
    clean = stats.extract(lite0, data.load(f"imagefolder:{root}", "train"), 32, batch_size=3, num_workers=0,
                          progress=False)
    torch.testing.assert_close(clean.means, st.means, rtol=1e-5, atol=1e-5)  # other batches: float32 sums
    assert clean.meta["num_skipped"] == 0
