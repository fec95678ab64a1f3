"""The command line end to end on tiny inputs: stats -> distill -> eval/baselines, errors, --help."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from sfm_lib.cli import main
from sfm_lib.distill import DistilledSet
from sfm_lib.stats import ClassStats


@pytest.mark.parametrize("command", ["stats", "distill", "eval", "baselines", "bench"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_python_dash_m_runs():
    out = subprocess.run([sys.executable, "-m", "sfm_lib", "--help"], capture_output=True, text=True, check=True)
    assert "stats" in out.stdout and "distill" in out.stdout


def test_stats_distill_eval_baselines(tmp_path, capsys, tiny_fmnist_dir, monkeypatch):
    monkeypatch.setenv("SFM_DATA", str(tiny_fmnist_dir))  # 270 train / 30 val / 100 test: fast full splits
    stats_path, out_path = tmp_path / "s.safetensors", tmp_path / "d.safetensors"
    assert main(["stats", "--resolution", "32", "--max-per-class", "5", "--out", str(stats_path),
                 "--device", "cpu"]) == 0
    with safe_open(str(stats_path), framework="pt") as f:
        assert f.get_tensor("means").shape == (10, 1280) and f.get_tensor("counts").tolist() == [5] * 10
    assert main(["stats", "--resolution", "32", "--out", str(tmp_path / "all.safetensors"), "--device", "cpu"]) == 0
    with safe_open(str(tmp_path / "all.safetensors"), framework="pt") as f:
        assert f.get_tensor("counts").tolist() == [27] * 10, "the whole (tiny) split less validation"
    assert main(["distill", "--stats", str(stats_path), "--resolution", "32", "--steps", "3",
                 "--out", str(out_path), "--device", "cpu"]) == 0
    with safe_open(str(out_path), framework="pt") as f:
        images, labels = f.get_tensor("images"), f.get_tensor("labels")
    assert images.shape == (10, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    assert labels.tolist() == list(range(10))
    # a finished run resumes to the same result; a fresh run refuses to clobber its checkpoint
    assert main(["distill", "--stats", str(stats_path), "--resolution", "32", "--steps", "3",
                 "--out", str(out_path), "--device", "cpu", "--resume"]) == 0
    assert main(["distill", "--stats", str(stats_path), "--resolution", "32", "--steps", "3",
                 "--out", str(out_path), "--device", "cpu"]) == 2
    assert "--resume" in capsys.readouterr().err
    ema_out = tmp_path / "ema.safetensors"
    assert main(["distill", "--stats", str(stats_path), "--resolution", "32", "--steps", "2", "--ema", "0.5",
                 "--out", str(ema_out), "--device", "cpu"]) == 0
    assert DistilledSet.load(ema_out).meta["ema"] == 0.5
    assert main(["distill", "--stats", str(stats_path), "--resolution", "32", "--steps", "2", "--ema", "1.5",
                 "--out", str(tmp_path / "bad.safetensors"), "--device", "cpu"]) == 2
    assert "ema must lie in [0, 1)" in capsys.readouterr().err
    recipe = DistilledSet.load(ema_out).meta["recipe"]  # the whole recipe, overrides named
    assert recipe["name"] == "fmnist-lite0-64 + steps=2, ema=0.5" and recipe["ema"] == 0.5
    assert recipe["init"] == "real" and recipe["crop_scale"] == 0.3 and recipe["lr"] == 0.05

    res = tmp_path / "r.json"
    assert main(["eval", "--distilled", str(out_path), "--backbone", "effnet_lite0", "--resolution", "32",
                 "--seeds", "2", "--epochs", "3", "--views", "2", "--json", str(res), "--device", "cpu"]) == 0
    got = json.loads(res.read_text())
    assert {"top1_mean", "top1_std", "seeds"} <= got.keys() and got["seeds"] == [0, 1]
    printed = capsys.readouterr().out
    assert "top-1 mean ± std over 2 probe seeds" in printed
    assert "recipe fmnist-lite0-64 + steps=3: steps 3, augs 2, ema 0.7" in printed
    paper = tmp_path / "paper.json"  # the papers' protocol: five seeds 3407-3411, population std
    assert main(["eval", "--distilled", str(out_path), "--resolution", "32", "--preset", "paper", "--epochs", "2",
                 "--views", "2", "--json", str(paper), "--device", "cpu", "--test-transform", "square"]) == 0
    got = json.loads(paper.read_text())
    assert got["seeds"] == [3407, 3408, 3409, 3410, 3411]
    assert got["top1_pstd"] == pytest.approx(float(torch.tensor(got["top1"]).std(unbiased=False)))
    assert "population std over 5 probe seeds" in capsys.readouterr().out
    for kind in ["random", "centroids", "neighbors", "full"]:
        res = tmp_path / f"{kind}.json"
        args = ["baselines", "--kind", kind, "--resolution", "32", "--seeds", "2", "--epochs", "2",
                "--views", "2", "--json", str(res), "--device", "cpu"]
        if kind == "neighbors":
            args += ["--distilled", str(out_path)]
        assert main(args) == 0, kind
        assert 0 <= json.loads(res.read_text())["top1_mean"] <= 100
    full = json.loads((tmp_path / "full.json").read_text())["meta"]
    assert full["views"] == 2 and full["augmented"] and full["n_test"] == 100 and full["scored_on"] == "test"
    capsys.readouterr()
    res = tmp_path / "full_val.json"  # a choice is made on the validation hold-out, not on test
    assert main(["baselines", "--kind", "full", "--resolution", "32", "--seeds", "1", "--epochs", "2", "--on", "val",
                 "--json", str(res), "--device", "cpu"]) == 0
    full = json.loads(res.read_text())["meta"]
    assert full["views"] == 1 and full["n_test"] == 30 and full["n_train"] == 270 and full["scored_on"] == "val"
    assert "full baseline on effnet_lite0, val split: top-1" in capsys.readouterr().out


def test_bad_input_gives_a_clear_message_and_status_2(tmp_path, capsys):
    assert main(["distill", "--stats", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["stats", "--dataset", "nope", "--out", str(tmp_path / "s")]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert main(["baselines", "--kind", "neighbors", "--resolution", "32"]) == 2
    assert "--distilled" in capsys.readouterr().err
    ClassStats(torch.zeros(10, 1280, dtype=torch.float64), torch.ones(10, dtype=torch.long), list("abcdefghij"),
               {"backbone": "effnet_lite0", "dataset": "cifar10"}).save(tmp_path / "c.safetensors")
    assert main(["distill", "--stats", str(tmp_path / "c.safetensors"), "--init", "real", "--steps", "1",
                 "--out", str(tmp_path / "o.safetensors"), "--device", "cpu"]) == 2
    assert "--dataset cifar10" in capsys.readouterr().err


def test_bench_prints_a_ratio_and_a_step_cost(tmp_path, capsys):
    assert main(["bench", "stats", "--resolution", "32", "--images", "64", "--batch-size", "32",
                 "--device", "cpu"]) == 0
    assert "ratio" in capsys.readouterr().out
    res = tmp_path / "b.json"
    assert main(["bench", "step", "--resolution", "32", "--classes", "3", "--steps", "1", "--device", "cpu",
                 "--two-pass", "--chunk-size", "2", "--json", str(res)]) == 0
    assert json.loads(res.read_text())["median_s"] > 0


# ------------------------------------------------------------------------------ recipes, several backbones
class _Captured(Exception):
    pass


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """distill.sfm / distill.lgm replaced by a spy that records its arguments and stops the command;
    two statistics files (lite0, lite1) and no training set needed (``--init noise`` where real data
    would be read)."""
    from sfm_lib import data, distill

    calls = []

    def spy(method):
        def f(*args, **kw):
            calls.append((method, args, kw))
            raise _Captured
        return f

    monkeypatch.setattr(distill, "sfm", spy("sfm"))
    monkeypatch.setattr(distill, "lgm", spy("lgm"))
    monkeypatch.setattr(data, "load", lambda *a, **k: "TRAIN")
    for name in ("effnet_lite0", "effnet_lite1"):
        ClassStats(torch.zeros(10, 1280, dtype=torch.float64), torch.ones(10, dtype=torch.long),
                   list("abcdefghij"), {"backbone": name, "dataset": "fashion_mnist"}).save(tmp_path / f"{name}.st")
    return calls


def _distill(tmp_path, *args):
    argv = ["distill", "--out", str(tmp_path / "o.safetensors"), "--device", "cpu", *args]
    with pytest.raises(_Captured):
        main(argv)


def test_distill_defaults_are_the_book_recipe(captured, tmp_path, capsys):
    from sfm_lib import recipes

    _distill(tmp_path, "--stats", str(tmp_path / "effnet_lite0.st"))
    (_, args, kw), = captured
    book = recipes.RECIPES[recipes.DEFAULT]
    assert recipes.DEFAULT == "fmnist-lite0-64"
    assert {k: kw[k] for k in ("steps", "augs", "ema", "init", "param", "lr", "schedule")} == \
        {"steps": 500, "augs": 2, "ema": 0.7, "init": "real", "param": "pixels", "lr": 0.05, "schedule": "constant"}
    assert kw["augment"] == book.augment() and kw["augment"].scale == (0.3, 1.0) and kw["augment"].noise_p == 0
    assert kw["init_dataset"] == "TRAIN"
    assert f"recipe: {book.describe()}" in capsys.readouterr().out


def test_distill_preset_paper_and_explicit_flags_override_it(captured, tmp_path, capsys):
    st = str(tmp_path / "effnet_lite0.st")
    _distill(tmp_path, "--stats", st, "--preset", "paper")
    kw = captured[-1][2]
    assert (kw["steps"], kw["param"], kw["grow_every"], kw["lr"], kw["init"], kw["ema"]) == \
        (5000, "pyramid", 200, 2e-3, "noise", 0.0)
    assert kw["augment"].scale == (0.08, 1.0) and kw["augment"].noise_p == 0.5 and kw["init_dataset"] is None
    assert "recipe: paper (measured on ImageNet" in capsys.readouterr().out
    _distill(tmp_path, "--stats", st, "--preset", "paper", "--steps", "7", "--noise-p", "0", "--lr", "0.01")
    kw = captured[-1][2]
    assert (kw["steps"], kw["lr"], kw["augment"].noise_p, kw["param"]) == (7, 0.01, 0.0, "pyramid")
    assert "recipe: paper + steps=7, noise_p=0.0, lr=0.01" in capsys.readouterr().out
    _distill(tmp_path, "--method", "lgm")  # LGM keeps its own 10 views per step
    assert captured[-1][0] == "lgm" and captured[-1][2]["augs"] == 10 and "ema" not in captured[-1][2]
    with pytest.raises(SystemExit) as info:
        main(["distill", "--stats", st, "--preset", "nope", "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and "choose from 'fmnist-lite0-64', 'paper'" in capsys.readouterr().err


def test_distill_with_two_backbones_pairs_them_with_the_statistics_in_order(captured, tmp_path, capsys):
    s0, s1 = str(tmp_path / "effnet_lite0.st"), str(tmp_path / "effnet_lite1.st")
    _distill(tmp_path, "--backbone", "effnet_lite0,effnet_lite1", "--stats", f"{s0},{s1}")
    _, (bbs, sts), kw = captured[-1]
    assert [b.name for b in bbs] == ["effnet_lite0", "effnet_lite1"]
    assert [s.meta["backbone"] for s in sts] == ["effnet_lite0", "effnet_lite1"] and kw["backbone_weights"] is None
    _distill(tmp_path, "--backbone", "effnet_lite0,effnet_lite1", "--stats", f"{s0},{s1}",
             "--backbone-weights", "1,3")
    assert captured[-1][2]["backbone_weights"] == [1.0, 3.0]
    _distill(tmp_path, "--stats", s0)  # one backbone: exactly as before (no list, no weights)
    _, (bb, st), kw = captured[-1]
    assert bb.name == "effnet_lite0" and isinstance(st, ClassStats) and "backbone_weights" not in kw
    capsys.readouterr()
    for extra, message in [(["--stats", s0], "names 2 backbone(s) but --stats 1 file(s)"),
                           (["--stats", f"{s0},{s1}", "--backbone-weights", "1"], "1 weight(s) for 2 backbone(s)"),
                           (["--stats", f"{s0},{s1}", "--backbone-weights", "1,x"], "numbers separated by commas")]:
        assert main(["distill", "--backbone", "effnet_lite0,effnet_lite1", *extra, "--out",
                     str(tmp_path / "o"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
