"""Fast loaders (issue 18): JPEG decoding with torchvision, the workers' reference resize, the default
worker count, the loader in the cache key, the ImageNet-like JPEG folder, `bench stats` on it, and LGM's
prefetched real batches (same batches as the in-process gather, exact resume)."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sfm_lib import bench, data, features


def _smooth(rng, h, w):
    coarse = Image.fromarray(rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8))
    noise = rng.integers(-25, 25, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(coarse.resize((w, h), Image.BICUBIC), int) + noise, 0, 255)
                           .astype(np.uint8))


@pytest.fixture
def mixed_jpegs(tmp_path):
    """Grey, RGB (4:2:0, 4:4:4, progressive) and CMYK JPEGs, a PNG, a truncated JPEG, a PNG named .jpg."""
    rng = np.random.default_rng(0)
    a, b = tmp_path / "train" / "a", tmp_path / "train" / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    _smooth(rng, 90, 120).convert("L").save(a / "grey.jpg", quality=90)
    _smooth(rng, 101, 77).save(a / "rgb420.jpg", quality=90)
    _smooth(rng, 64, 80).save(a / "rgb444.jpeg", quality=95, subsampling=0)
    _smooth(rng, 70, 70).save(b / "prog.JPEG", quality=75, progressive=True)
    _smooth(rng, 66, 99).convert("CMYK").save(b / "cmyk.jpg", quality=90)
    _smooth(rng, 50, 60).save(b / "plain.png")
    _smooth(rng, 40, 52).save(b / "png_named.jpg", format="PNG")
    buf = io.BytesIO()
    _smooth(rng, 80, 80).save(buf, "JPEG", quality=90)
    (b / "truncated.jpg").write_bytes(buf.getvalue()[:900])
    return tmp_path


def _folder(root, skip_bad=False):
    """Every file of root/train (data.load's "train" split holds some out for validation)."""
    return data.ImageFolderDataset(root / "train", ["a", "b"], f"imagefolder:{root}", skip_bad=skip_bad)


def test_torchvision_jpeg_decoding_gives_the_pil_pixels(mixed_jpegs):
    ds = _folder(mixed_jpegs)
    assert Image.open(mixed_jpegs / "train" / "b" / "cmyk.jpg").mode == "CMYK"
    for i, path in enumerate(ds.files):
        if path.name == "truncated.jpg":
            for read in (ds.read_uint8, lambda j: features.read_image(ds, j)):  # both name the file
                with pytest.raises(data.BadImageError, match="truncated.jpg"):
                    read(i)
            continue
        got, ref = features.read_image(ds, i), ds.read_uint8(i)
        assert got.dtype == torch.uint8 and got.shape == ref.shape and torch.equal(got, ref), path.name


def test_a_decompression_bomb_is_refused_as_pil_refuses_it(mixed_jpegs, monkeypatch):
    ds = _folder(mixed_jpegs)
    i = [p.name for p in ds.files].index("rgb420.jpg")  # 101 × 77 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 101 * 77 // 2 - 1)
    with pytest.raises(data.BadImageError, match="DecompressionBombError"):
        features.read_image(ds, i)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 101 * 77 // 2 + 1)
    assert features.read_image(ds, i).shape == (3, 101, 77)


def test_torchvision_is_the_path_taken_for_jpegs(mixed_jpegs, monkeypatch):
    # The equality above would hold trivially if every file fell back to PIL: count the PIL reads.
    ds = _folder(mixed_jpegs)
    reads = []
    real = data.ImageFolderDataset.read_uint8
    monkeypatch.setattr(data.ImageFolderDataset, "read_uint8", lambda self, i: reads.append(i) or real(self, i))
    for i, path in enumerate(ds.files):
        if path.name != "truncated.jpg":
            features.read_image(ds, i)
    assert sorted(ds.files[i].name for i in reads) == ["plain.png", "png_named.jpg"]


def test_worker_items_are_real_images_bit_for_bit(mixed_jpegs):
    ds = _folder(mixed_jpegs)
    good = [i for i, p in enumerate(ds.files) if p.name != "truncated.jpg"]
    sub = data.subset(data.subset(ds, good[::-1]), [0, 2, 3, 5])  # nested subsets map to the right files
    ref = data.real_images(sub, range(len(sub)), 24)
    (images, labels, consumed, bad), = features.folder_batches(sub, [range(len(sub))], 24, num_workers=0)
    assert torch.equal(images, ref) and consumed == 4 and bad == []
    assert torch.equal(labels, sub.targets)


@pytest.mark.usefixtures("single_thread")
def test_feature_pass_on_jpegs_with_workers_matches_the_reference(mixed_jpegs, lite0):
    ds = _folder(mixed_jpegs, skip_bad=True)
    good = [i for i, p in enumerate(ds.files) if p.name != "truncated.jpg"]
    with torch.no_grad():  # reference, per image: PIL pixels → float → centre square → bilinear → φ
        ref = torch.cat([lite0.features(data.square_resize(ds[i][0], 32)[None], 32) for i in good])
    skipped = []
    out = list(features.iterate(lite0, ds, 32, batch_size=3, num_workers=2, progress=False, skipped=skipped))
    assert skipped == [str(mixed_jpegs / "train" / "b" / "truncated.jpg")]
    got, labels = torch.cat([f for f, _ in out]), torch.cat([y for _, y in out])
    assert torch.equal(labels, ds.targets[good])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # batch-vs-single float32 sums only


def test_default_workers_are_the_cores_this_process_may_use(monkeypatch, mixed_jpegs, fmnist_train):
    monkeypatch.setattr(features.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    folder = _folder(mixed_jpegs)
    assert features.available_cores() == 3 and features.default_workers(folder) == 3
    assert features.default_workers(fmnist_train) == 0  # in memory: no workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: the node's cores shared among its processes
    assert features.default_workers(folder) == 1


def test_the_loader_is_part_of_the_feature_cache_key(monkeypatch, mixed_jpegs, lite0):
    ds = _folder(mixed_jpegs)
    ds.split = "train"  # a whole split: cached
    before = features.cache_path(lite0, ds, 32)
    assert before is not None
    monkeypatch.setattr(features, "LOADER", features.LOADER + "-other")
    assert features.cache_path(lite0, ds, 32) != before


def test_jpeg_folder_is_imagenet_like(tmp_path):
    root = bench.jpeg_folder(tmp_path / "jpegs", classes=2, per_class=3, seed=1)
    train, test = sorted((root / "train").glob("*/*")), sorted((root / "test").glob("*/*"))
    assert len(train) == 6 and len(test) == 2
    assert data.load(f"imagefolder:{root}", "test").classes == ["class000", "class001"]
    for path in train + test:
        assert path.suffix == ".JPEG"
        with Image.open(path) as im:
            w, h = im.size
            assert im.format == "JPEG" and im.mode == "RGB"
        assert 333 <= min(w, h) <= 500 and max(w, h) / min(w, h) <= 4 / 3 + 0.01
    again = bench.jpeg_folder(tmp_path / "again", classes=2, per_class=3, seed=1)
    assert (again / "train" / "class001" / "train_001_00002.JPEG").read_bytes() == \
        (root / "train" / "class001" / "train_001_00002.JPEG").read_bytes()


@pytest.mark.usefixtures("single_thread")
def test_bench_stats_on_a_jpeg_folder_reports_the_three_throughputs(tmp_path, lite0):
    root = bench.jpeg_folder(tmp_path / "jpegs", classes=2, per_class=4, seed=0)
    ds = data.ImageFolderDataset(root / "train", ["class000", "class001"], f"imagefolder:{root}")
    row = bench.stats_throughput(lite0, ds, 32, images=8, batch_size=4, repeats=1, num_workers=1)
    for key in ("decode_img_s", "forward_img_s", "pipeline_img_s"):
        assert row[key] > 0, key
    slower = min(row["decode_img_s"], row["forward_img_s"])
    want = row["pipeline_img_s"] / slower
    # the throughputs are rounded to 0.1 img/s and the ratio to 0.001: allow for both roundings
    slack = 5e-4 + want * (0.05 / row["pipeline_img_s"] + 0.05 / slower)
    assert row["ratio"] == pytest.approx(want, abs=slack)
    assert (row["images"], row["workers"], row["backbone"], row["resolution"]) == (8, 1, lite0.name, 32)
    assert row["device"] == "cpu"


# ------------------------------------------------------------------------------------- LGM's real batches
@pytest.fixture(scope="module")
def jpeg_train(tmp_path_factory):
    root = bench.jpeg_folder(tmp_path_factory.mktemp("lgm_jpegs"), classes=3, per_class=4, seed=2)
    return data.ImageFolderDataset(root / "train", ["class000", "class001", "class002"], f"imagefolder:{root}")


def test_prefetched_real_batches_are_the_gathered_ones(jpeg_train):
    from sfm_lib.data import real_images
    from sfm_lib.objectives import RealStream

    plain = RealStream(jpeg_train, 5, seed=1, num_workers=0)
    ahead = RealStream(jpeg_train, 5, seed=1, num_workers=2)
    for step in range(4):  # 20 images of a 12-image folder: batches run into the next epochs
        rows = (1, 4) if step == 2 else None  # a torchrun rank's block of the batch
        idx = plain.next_indices()
        want = real_images(jpeg_train, idx if rows is None else idx[1:4], 24)
        x, y = ahead.next(24, rows)
        assert torch.equal(x, want) and torch.equal(y, jpeg_train.targets[idx]), step
        assert torch.equal(ahead.position, plain.position)
    workers = ahead._ahead[1]._workers
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    ahead.close()  # stopped now, not whenever the garbage collector breaks the stream's reference cycle
    assert ahead._ahead is None and not any(w.is_alive() for w in workers)
    x, _ = ahead.next(24)  # and a closed stream goes on from its position
    assert torch.equal(x, real_images(jpeg_train, plain.next_indices(), 24))
    ahead.close()


def test_prefetched_stream_resumes_exactly(jpeg_train):
    from sfm_lib.objectives import RealStream

    straight = RealStream(jpeg_train, 4, seed=3, num_workers=2)
    want = [straight.next(16)[0] for _ in range(5)]
    first = RealStream(jpeg_train, 4, seed=3, num_workers=2)
    [first.next(16) for _ in range(2)]  # its loader has read ahead of the position
    resumed = RealStream(jpeg_train, 4, seed=3, num_workers=2)
    resumed.load_state_dict(first.state_dict())
    got = [resumed.next(16)[0] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(got, want[2:]))
    assert not torch.equal(want[2], want[3])  # distinct batches: the comparison can fail
    first.load_state_dict(straight.state_dict())  # a running stream moved back: rebuilt from the position
    restarted = RealStream(jpeg_train, 4, seed=3, num_workers=0)
    restarted.load_state_dict(straight.state_dict())
    assert torch.equal(first.next(16)[0], restarted.next(16)[0])
    for stream in (straight, first, resumed):
        stream.close()


@pytest.mark.usefixtures("single_thread")
def test_real_forward_in_chunks_equals_one_forward(jpeg_train, lite0):
    from sfm_lib.objectives import LGMObjective

    g = []
    for chunk in (None, 2):
        obj = LGMObjective(jpeg_train, lite0, ipc=1, augs=2, resolution=24, head_std=0.5, seed=0, num_workers=1)
        obj.chunk_size = chunk
        obj.begin_step()
        g.append(obj.g_real)
        obj.close()
    assert g[0].abs().max() > 0
    torch.testing.assert_close(g[1], g[0], rtol=1e-4, atol=1e-6 * float(g[0].abs().max()))


@pytest.mark.usefixtures("single_thread")
def test_lgm_on_a_jpeg_folder_stopped_and_resumed_is_bit_identical(jpeg_train, lite0, tmp_path):
    from sfm_lib import distill

    def run(**kw):
        return distill.lgm(lite0, jpeg_train, ipc=1, steps=4, resolution=24, augs=1, progress=False, seed=1,
                           checkpoint_every=1, **kw)

    full = run(checkpoint=tmp_path / "full.pt")

    def stop(step, loss, images):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(checkpoint=tmp_path / "part.pt", callback=stop)
    resumed = run(checkpoint=tmp_path / "part.pt", resume=True)
    assert torch.equal(resumed.images, full.images)
    assert resumed.meta["loss_history"] == full.meta["loss_history"]


def test_cli_bench_stats_on_an_image_folder_writes_the_json(tmp_path, capsys):
    from sfm_lib.cli import main

    root = bench.jpeg_folder(tmp_path / "jpegs", classes=2, per_class=6, seed=0)
    out = tmp_path / "s.json"
    assert main(["bench", "stats", "--dataset", f"imagefolder:{root}", "--resolution", "32", "--images", "8",
                 "--batch-size", "4", "--workers", "1", "--threads", "1", "--device", "cpu", "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    for key in ("decode_img_s", "forward_img_s", "pipeline_img_s", "ratio", "workers", "backbone", "resolution",
                "device", "images"):
        assert key in row, key
    assert row["workers"] == 1 and row["dataset"] == f"imagefolder:{root.resolve()}"
    assert "decode only" in capsys.readouterr().out
