"""A folder of photos of different sizes and modes (ImageNet's layout) through every command that gathers
real images: the real-image start, centroid and neighbour images, the fit sets of classifier inheritance,
LGM's real batch and the baselines. Each must resize exactly as the statistics pass does."""
from __future__ import annotations

import json

import pytest
import torch

from folders import mixed_folder
from sfm_lib import data, features
from sfm_lib.cli import main
from sfm_lib.distill import DistilledSet

RES = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return mixed_folder(tmp_path_factory.mktemp("mixed"), classes=3, per_class=8, test_per_class=3)


def test_the_folder_really_mixes_sizes_and_modes(folder):
    from PIL import Image

    files = sorted((folder / "train").rglob("*.*"))
    sizes = {Image.open(f).size for f in files}
    modes = {Image.open(f).mode for f in files}
    assert len(sizes) > 10 and {"RGB", "L", "CMYK", "RGBA", "P", "LA"} <= modes and any(m.startswith("I") for m in modes)


def test_real_images_resize_as_the_statistics_pass_does(folder, lite0):
    """data.real_images → φ equals the feature pass's features of the same files (the pass resizes in its
    workers from uint8 centre squares; here the float image is resized whole)."""
    train = data.load(f"imagefolder:{folder}", "train")
    idx = torch.arange(len(train))
    with torch.no_grad():
        direct = lite0.features(data.real_images(train, idx, RES), RES)
    passed, labels = features.compute(lite0, train, RES, cache=False, progress=False, num_workers=0)
    assert torch.equal(labels, train.targets)
    torch.testing.assert_close(passed, direct.half().float(), rtol=0, atol=2e-2)  # float16 rounding of the pass


def test_every_command_runs_on_the_mixed_folder(folder, tmp_path, capsys):
    name = f"imagefolder:{folder}"
    common = ["--dataset", name, "--resolution", str(RES), "--device", "cpu"]
    st, sfm, lgm = tmp_path / "st.safetensors", tmp_path / "sfm.safetensors", tmp_path / "lgm.safetensors"
    assert main(["stats", *common, "--out", str(st), "--quiet"]) == 0
    assert main(["distill", *common, "--stats", str(st), "--steps", "2", "--init", "real", "--out", str(sfm)]) == 0
    assert main(["distill", *common, "--method", "lgm", "--steps", "2", "--augs", "1", "--init", "real",
                 "--out", str(lgm)]) == 0
    clp = tmp_path / "clp.safetensors"
    assert main(["distill", *common, "--method", "clp", "--steps", "2", "--init", "real", "--real-batch", "16",
                 "--out", str(clp)]) == 0
    assert DistilledSet.load(clp).meta["method"] == "clp"
    refined = tmp_path / "refined.safetensors"  # ours: the sfm result refined by unrolled-probe matching
    assert main(["distill", *common, "--method", "unrolled", "--init-from", str(sfm), "--steps", "2", "--lr", "0.01",
                 "--probe-steps", "3", "--real-batch", "16", "--out", str(refined)]) == 0
    meta = DistilledSet.load(refined).meta
    assert meta["method"] == "unrolled" and meta["init_from"] == str(sfm) and meta["unrolled.probe_steps"] == 3
    assert not torch.equal(DistilledSet.load(refined).images, DistilledSet.load(sfm).images)
    capsys.readouterr()
    assert main(["distill", *common, "--method", "unrolled", "--init-from", str(sfm), "--ipc", "2", "--steps", "1",
                 "--out", str(tmp_path / "no.safetensors")]) == 2
    bad = capsys.readouterr().err.strip().splitlines()
    assert len(bad) == 1 and "--init-from" in bad[0] and "needs 6 (--ipc 2)" in bad[0], bad
    uneven = DistilledSet.load(sfm)  # three images, but two of class 0 and none of class 2
    uneven.labels = torch.tensor([0, 0, 1])
    uneven.save(tmp_path / "uneven.safetensors")
    assert main(["distill", *common, "--method", "unrolled", "--init-from", str(tmp_path / "uneven.safetensors"),
                 "--steps", "1", "--out", str(tmp_path / "no.safetensors")]) == 2
    bad = capsys.readouterr().err.strip().splitlines()
    assert len(bad) == 1 and "[2, 1, 0] images per class" in bad[0], bad
    for path in (sfm, lgm, clp, refined):
        d = DistilledSet.load(path)
        assert d.images.shape == (3, 3, RES, RES) and torch.isfinite(d.images).all()
    probe = ["--seeds", "1", "--epochs", "2", "--views", "2"]
    assert main(["eval", *common, "--distilled", str(sfm), *probe]) == 0
    for kind in ("random", "centroids", "neighbors", "full"):
        extra = ["--distilled", str(sfm)] if kind == "neighbors" else []
        js = tmp_path / f"{kind}.json"
        assert main(["baselines", *common, "--kind", kind, *probe[:4], *extra, "--json", str(js)]) == 0, kind
        assert 0 <= json.loads(js.read_text())["top1_mean"] <= 100
    out = tmp_path / "inherit.json"
    assert main(["inherit", *common, "--distilled", str(sfm), "--distill-backbone", "effnet_lite0",
                 "--eval-backbone", "effnet_lite0", "--views", "2", "--alpha", "0.1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())
    assert main(["export", "--distilled", str(sfm), "--out", str(tmp_path / "exported")]) == 0
    assert len(list((tmp_path / "exported").rglob("*.png"))) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
