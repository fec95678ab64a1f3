"""experiments: the chapters' one-call set-up, the distillation cache and sweeps."""
from __future__ import annotations

import pytest
import torch

from sfm_lib import distill, experiments


@pytest.fixture(scope="module")
def ctx(session_cache):
    return experiments.prepare("fashion_mnist", "effnet_lite0", 32, images_per_class=6, device="cpu", kmeans_k=2)


def test_prepare_gives_statistics_of_the_subset(ctx):
    assert len(ctx.train) == 60 and ctx.stats.counts.tolist() == [6] * 10
    assert ctx.stats.centres.shape == (10, 2, 1280) and ctx.stats.meta["kmeans_k"] == 2
    assert "60 train" in repr(ctx)


def test_distilled_is_cached_by_its_arguments(ctx, monkeypatch):
    first = experiments.distilled(ctx, steps=2, seed=5, crop_scale=0.3, noise_p=0.0)
    assert first.meta["augment"]["scale"] == [0.3, 1.0] or tuple(first.meta["augment"]["scale"]) == (0.3, 1.0)
    assert first.meta["augment"]["noise_p"] == 0.0
    calls = []
    monkeypatch.setattr(distill, "sfm", lambda *a, **k: calls.append(k) or first)
    again = experiments.distilled(ctx, steps=2, seed=5, crop_scale=0.3, noise_p=0.0)
    assert not calls and torch.equal(again.images, first.images)
    experiments.distilled(ctx, steps=2, seed=6, crop_scale=0.3, noise_p=0.0)  # other seed: a new run
    assert len(calls) == 1
    experiments.distilled(ctx, steps=2, seed=5, crop_scale=0.3, noise_p=0.0, callback=lambda *a: None)
    assert len(calls) == 2, "a callback forces the run"


def test_sub_class_centres_key_only_runs_with_sub_class_targets(ctx, monkeypatch):
    """A context with k-means centres (chapters 3 and 4) shares plain SFM runs with one without (chapters 2
    and 5): the centres enter the key only when the targets use them."""
    import dataclasses

    plain = experiments.distilled(ctx, steps=2, seed=11)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(len(ctx.stats.classes), 2, ctx.stats.means.shape[1], generator=g, dtype=torch.float64)
    with_centres = dataclasses.replace(ctx, stats=dataclasses.replace(ctx.stats, centres=centres))
    calls = []
    monkeypatch.setattr(distill, "sfm", lambda *a, **k: calls.append(k) or plain)
    again = experiments.distilled(with_centres, steps=2, seed=11)
    assert not calls and torch.equal(again.images, plain.images)
    experiments.distilled(with_centres, steps=2, seed=11, ipc=2, subclass=True)  # the centres matter: a run
    experiments.distilled(dataclasses.replace(with_centres, stats=dataclasses.replace(
        ctx.stats, centres=centres.flip(0))), steps=2, seed=11, ipc=2, subclass=True)  # other centres: a run
    assert len(calls) == 2


def test_real_init_takes_the_chapter_training_set(ctx):
    out = experiments.distilled(ctx, steps=0, init="real", seed=1)
    assert out.meta["init"] == "real" and out.images.shape == (10, 3, 32, 32)


def test_sweep_returns_a_tidy_table(ctx):
    df = experiments.sweep(ctx, experiments.ABLATIONS["loss"], base={"steps": 2}, probe_seeds=(0,), epochs=2,
                           views=2)
    assert list(df["variant"]) == list(experiments.ABLATIONS["loss"])
    assert {"top1_mean", "top1_std", "final_loss", "distill_seed"} <= set(df.columns)
    assert not [c for c in df.columns if "time" in c], "cached rows would show another run's time"
    assert df["top1_mean"].between(0, 100).all() and df["val_top1_mean"].between(0, 100).all()


def test_the_validation_score_is_the_same_probes_on_the_validation_split(ctx):
    """score_on re-scores the trained probes; training probes with the same seeds and scoring them on the
    validation split directly gives the same numbers. The choice is the best validation mean."""
    import pandas as pd

    from sfm_lib import evaluate

    d = experiments.distilled(ctx, steps=2, seed=0)
    on_test = evaluate.linear_probe(ctx.backbone, d, ctx.test, 32, epochs=3, seeds=(0, 1), views=2)
    direct = evaluate.linear_probe(ctx.backbone, d, ctx.val, 32, epochs=3, seeds=(0, 1), views=2)
    assert evaluate.score_on(on_test, ctx.backbone, ctx.val, 32).top1 == direct.top1
    table = pd.DataFrame({"ablation": ["a", "a", "a", "b", "b"], "variant": ["x", "x", "y", "u", "v"],
                          "val_top1_mean": [50.0, 60.0, 54.0, 70.0, 71.0], "top1_mean": [1, 2, 3, 4, 5]})
    chosen = experiments.choose_on_validation(table, within="ablation")
    assert chosen.to_dict("records") == [{"ablation": "a", "chosen": "x", "val_top1": 55.0, "test_top1": 1.5},
                                         {"ablation": "b", "chosen": "v", "val_top1": 71.0, "test_top1": 5.0}]


def test_distilled_with_several_backbones_is_cached_by_every_backbone_and_statistics(ctx, monkeypatch):
    ctx1 = experiments.prepare("fashion_mnist", "effnet_lite1", 32, images_per_class=6, device="cpu")
    pair = experiments.distilled([ctx, ctx1], steps=1, seed=5)
    assert pair.meta["backbones"] == ["effnet_lite0", "effnet_lite1"]
    assert pair.meta["backbone_weights"] == [0.5, 0.5]
    calls = []
    monkeypatch.setattr(distill, "sfm", lambda *a, **k: calls.append(a) or pair)
    again = experiments.distilled([ctx, ctx1], steps=1, seed=5)
    assert not calls and torch.equal(again.images, pair.images)
    experiments.distilled(ctx, steps=1, seed=5)  # lite0 alone: another key
    experiments.distilled([ctx, ctx1], steps=1, seed=5, backbone_weights=[2, 1])  # other weights
    other = experiments.Context(ctx1.train, ctx1.test, ctx1.backbone,
                                distill.ClassStats(ctx1.stats.means + 1, ctx1.stats.counts, ctx1.stats.classes,
                                                   ctx1.stats.meta), ctx1.resolution)
    experiments.distilled([ctx, other], steps=1, seed=5)  # other statistics of the second backbone
    assert len(calls) == 3
    assert [type(a[0]).__name__ for a in calls] == ["Backbone", "list", "list"]
    with pytest.raises(ValueError, match="method='sfm' only"):
        experiments.distilled([ctx, ctx1], method="lgm", steps=1)


def test_step_seconds_of_one_and_two_backbones(ctx):
    ctx1 = experiments.prepare("fashion_mnist", "effnet_lite1", 32, images_per_class=6, device="cpu")
    one = experiments.step_seconds(ctx, steps=2, repeats=1, init="real")
    two = experiments.step_seconds([ctx, ctx1], steps=2, repeats=1, init="real")
    assert 0 < one and 0 < two


def test_sfm_then_unrolled_runs_both_stages_from_one_start_and_numbers_the_steps_through(ctx):
    """Ours: SFM for 7 of 10 steps, then the unrolled probe for 3 from SFM's images; the callback sees
    steps 0 … 9, and each stage is the cached run of its method."""
    seen = []
    ours = experiments.distilled(ctx, method="sfm+unrolled", steps=10, seed=2, init="real", real_batch=32,
                                 probe_steps=3, callback=lambda step, loss, images: seen.append(step))
    assert seen == list(range(10))
    assert ours.meta["method"] == "sfm+unrolled" and ours.meta["sfm_steps"] == 7 and ours.meta["refine_steps"] == 3
    assert len(ours.meta["loss_history"]) == 10 and ours.meta["refine_lr"] == experiments.REFINE_LR
    first = experiments.distilled(ctx, steps=7, seed=2, init="real")
    assert not torch.equal(first.images, ours.images), "the refinement moved the images"
    then = experiments.distilled(ctx, method="unrolled", steps=3, seed=2, init=first.images.clone(),
                                 lr=experiments.REFINE_LR, real_batch=32, probe_steps=3,
                                 augs=experiments.REFINE_AUGS)  # the refinement's own views per step
    torch.testing.assert_close(then.images, ours.images, rtol=0, atol=0)
    assert ours.meta["refine_augs"] == experiments.REFINE_AUGS != 1
    same = experiments.distilled(ctx, method="sfm+unrolled", steps=10, seed=2, init="real", real_batch=32,
                                 probe_steps=3, augs=2, refine_augs=None)  # None: SFM's views per step
    assert same.meta["refine_augs"] == 2
    with pytest.raises(ValueError, match="refine_fraction must lie in"):
        experiments.distilled(ctx, method="sfm+unrolled", steps=10, refine_fraction=1.5)


def test_ablation_table_is_one_sweep_per_ablation_and_views_get_the_equal_cost_row(monkeypatch):
    import pandas as pd

    calls = []

    def sweep(ctx, variants, *, base, **kw):
        calls.append((dict(variants), base, kw))
        return pd.DataFrame({"variant": list(variants), "top1_mean": range(len(variants))})

    monkeypatch.setattr(experiments, "sweep", sweep)
    table = experiments.ablation_table("ctx", ["augs", "loss"], {"steps": 7}, distill_seeds=(3,), epochs=5)
    assert [c[0] for c in calls] == [{**experiments.ABLATIONS["augs"], "A=1, twice the steps":
                                      {"augs": 1, "steps": 14}}, experiments.ABLATIONS["loss"]]
    assert all(c[1] == {"steps": 7} and c[2]["distill_seeds"] == (3,) and c[2]["epochs"] == 5 for c in calls)
    assert table["ablation"].tolist() == ["augs"] * 3 + ["loss"] * 2
    assert table["variant"].tolist() == ["A=1", "A=2", "A=1, twice the steps", *experiments.ABLATIONS["loss"]]
    assert experiments.ablation_table("ctx", [], {"steps": 7}).empty
    with pytest.raises(ValueError, match="unknown ablations \\['colour'\\]"):
        experiments.ablation_table("ctx", ["colour"], {"steps": 7})


def test_recorded_ablations_shows_only_the_rows_of_the_same_setting(tmp_path):
    import json

    rows = [{"ablation": "ema", "variant": "no smoothing", "val_top1_mean": 70.0, "top1_mean": 69.0}]
    (tmp_path / "ipc1.json").write_text(json.dumps({"setting": {"dataset": "fmnist", "probe_seeds": [0, 1]},
                                                    "rows": rows}))
    (tmp_path / "other.json").write_text(json.dumps({"runs": {}}))
    assert experiments.recorded_ablations(str(tmp_path)).to_dict("records") == rows
    same = {"dataset": "fmnist", "probe_seeds": [0, 1]}
    assert experiments.recorded_ablations(str(tmp_path), setting=same).to_dict("records") == rows
    for other in ({**same, "dataset": "cifar10"}, {**same, "probe_seeds": [0]}, {**same, "recipe": "paper"}):
        empty = experiments.recorded_ablations(str(tmp_path), setting=other)
        assert empty.empty and "val_top1_mean" in empty.columns  # the chapter indexes its columns
    assert experiments.recorded_ablations(str(tmp_path / "missing")).empty


def test_the_setting_of_a_recorded_run_is_the_data_backbone_input_and_recipe_not_the_device(ctx):
    from sfm_lib import recipes

    run = recipes.run("fmnist-lite0-64", {})
    got = experiments.setting(ctx, run, epochs=3)
    assert got["dataset"] == ctx.train.name and got["train_images"] == len(ctx.train)
    assert got["backbone"] == ctx.backbone.name and got["resolution"] == ctx.resolution
    assert got["recipe"] == run.describe() and got["epochs"] == 3 and "device" not in got
    assert experiments.setting(ctx, recipes.run("fmnist-lite0-64", {"lr": 0.01}))["recipe"] != got["recipe"]
    assert "cpu" not in str(got)


def test_the_recorded_ablations_are_in_chapter_3s_setting():
    """Chapter 3 shows results/ablations/ipc1.json only where its setting equals the chapter's: a change of
    the recipe or of the chapter's probe defaults must come with a new recording (scripts/record_ablations.py)."""
    import json
    from pathlib import Path

    import papermill as pm

    from sfm_lib import recipes

    root = Path(__file__).resolve().parents[1]
    record = json.loads((root / "results" / "ablations" / "ipc1.json").read_text())
    rows = experiments.recorded_ablations()
    assert list(dict.fromkeys(rows["ablation"])) == ["augs", "ema", "noise", "param", "loss"] and len(rows) == 11
    chapter = pm.inspect_notebook(str(root / "book" / "03_evaluation.ipynb"))
    declared = {k: eval(v["default"]) for k, v in chapter.items()}
    got = record["setting"]
    assert got["recipe"] == recipes.run(declared["recipe"], declared["recipe_overrides"]).describe()
    assert (got["dataset"], got["backbone"], got["resolution"]) == (declared["dataset"], declared["backbone"],
                                                                     declared["resolution"])
    assert got["probe_seeds"] == declared["probe_seeds"] and got["distill_seeds"] == declared["distill_seeds"][:1]
    assert (got["epochs"], got["views"]) == (declared["epochs"], declared["views"]) and declared["ablations"] == []
