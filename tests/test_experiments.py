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


@pytest.mark.parametrize("steps, k, want", [(500, 1, 500), (500, 2, 250), (5000, 2, 2500), (7, 2, 4), (1, 3, 1)])
def test_equal_time_steps_give_each_backbone_its_share_of_the_steps(steps, k, want):
    got = experiments.equal_time_steps(steps, k)
    assert got == want and (got - 1) * k < steps <= got * k  # the fewest steps whose K-fold covers them


def test_equal_time_steps_refuse_nothing_to_share():
    with pytest.raises(ValueError, match="must be ≥ 1, got 0 and 2"):
        experiments.equal_time_steps(0, 2)


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
    assert table["recipe"].tolist() == [True, False, False, True, False]  # sfm's defaults: A = 1, flows
    assert experiments.ablation_table("ctx", [], {"steps": 7}).empty
    with pytest.raises(ValueError, match="unknown ablations \\['colour'\\]"):
        experiments.ablation_table("ctx", ["colour"], {"steps": 7})


def test_every_ablation_of_the_default_recipe_has_exactly_one_variant_that_restates_it():
    from sfm_lib import recipes

    base = {**recipes.run("fmnist-lite0-64", {}).sfm_kwargs(), "ipc": 1}
    own = {name: [v for v, kw in variants.items() if experiments._is_recipe(kw, base)]
           for name, variants in experiments.ABLATIONS.items()}
    assert own == {"augs": ["A=2"], "ema": ["smoothed, β=0.7"], "init": ["random real images"],
                   "noise": ["no noise"], "crop": ["crop area 30-100%"], "param": ["pixels"],
                   "loss": ["flow (SFM)"], "subclass": ["class targets"], "ipc": ["IPC 1"]}


def test_a_change_of_the_recipe_must_lead_it_on_validation_by_more_than_the_seeds_spread():
    import pandas as pd

    rows = [("a", "x", True, 70.0), ("a", "x", True, 72.0), ("a", "y", False, 72.0), ("a", "y", False, 72.5),
            ("b", "u", True, 60.0), ("b", "u", True, 60.2), ("b", "v", False, 63.0), ("b", "v", False, 63.4),
            ("c", "r", True, 50.0), ("c", "s", False, 50.5), ("d", "p", False, 40.0), ("d", "q", True, 40.0)]
    table = pd.DataFrame(rows, columns=["ablation", "variant", "recipe", "val_top1_mean"]).assign(top1_mean=1.0)
    got = experiments.choose_on_validation(table, within="ablation").set_index("ablation")
    assert got["chosen"].tolist() == ["x", "v", "s", "q"]  # a: 1.25 < 1.41; b: 3.1 > 0.28; c: one seed; d: tie
    assert got.loc["a", "recipe"] == "x" and got.loc["a", "lead"] == pytest.approx(1.25)
    assert got.loc["a", "spread"] == pytest.approx(2 ** 0.5) and got.loc["c", "spread"] == 0.0
    assert got.loc["d", "lead"] == 0.0 and got["other"].tolist() == ["y", "v", "s", "p"]
    assert got.loc["a", "val_top1"] == pytest.approx(71.0) and got.loc["b", "val_top1"] == pytest.approx(63.2)
    ahead = table.assign(recipe=~table["recipe"])  # now y, v, s and p are the recipe's
    got = experiments.choose_on_validation(ahead, within="ablation").set_index("ablation")
    assert got["chosen"].tolist() == ["y", "v", "s", "p"] and got.loc["b", "lead"] == pytest.approx(-3.1)


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
    # a recording's own steps key it: a chapter that builds with 200 steps finds the run of 1000
    longer = experiments.setting(ctx, recipes.run("fmnist-lite0-64", {}, steps=200), steps=1000)
    assert longer == experiments.setting(ctx, recipes.run("fmnist-lite0-64", {}, steps=1000), steps=1000)
    assert ": 1000 steps," in longer["recipe"] and longer["recipe"] != got["recipe"]
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
    assert list(dict.fromkeys(rows["ablation"])) == ["augs", "ema", "noise", "param", "loss"] and len(rows) == 33
    assert rows["recipe"].sum() == 5 * 3  # one of each pair restates the recipe, for every seed
    chapter = pm.inspect_notebook(str(root / "book" / "03_evaluation.ipynb"))
    declared = {k: eval(v["default"]) for k, v in chapter.items()}
    got = record["setting"]
    assert got["recipe"] == recipes.run(declared["recipe"], declared["recipe_overrides"]).describe()
    assert (got["dataset"], got["backbone"], got["resolution"]) == (declared["dataset"], declared["backbone"],
                                                                     declared["resolution"])
    assert got["probe_seeds"] == declared["probe_seeds"] and got["distill_seeds"] == declared["distill_seeds"]
    assert (got["epochs"], got["views"]) == (declared["epochs"], declared["views"]) and declared["ablations"] == []


def test_recorded_comparison_shows_the_rows_of_the_same_setting_with_their_command_and_machine(tmp_path):
    import json

    rows = [{"method": "SFM", "comparison": "equal steps", "distill_seed": 0, "top1_mean": 77.0}]
    (tmp_path / "ipc10.json").write_text(json.dumps({"command": "python scripts/record_comparison.py",
                                                     "machine": "2 CPU cores", "rows": rows,
                                                     "setting": {"ipc": 10, "methods": {"SFM": {"augs": 1}}}}))
    (tmp_path / "broken.json").write_text("{")
    got = experiments.recorded_comparison(str(tmp_path), setting={"ipc": 10, "methods": {"SFM": {"augs": 1}}})
    assert got.to_dict("records") == rows
    assert got.attrs == {"command": "python scripts/record_comparison.py", "machine": "2 CPU cores"}
    for other in ({"ipc": 1}, {"ipc": 10, "methods": {"SFM": {"augs": 2}}}, {"steps": 200}):
        empty = experiments.recorded_comparison(str(tmp_path), setting=other)
        assert empty.empty and {"method", "comparison", "time_s", "val_top1_mean"} <= set(empty.columns)


def test_chapter_4s_methods_put_sfm_first_and_see_one_view_at_the_larger_ipc():
    from sfm_lib import recipes

    r = recipes.get("fmnist-lite0-64")
    small = experiments.comparison_methods(r, lgm_augs=3)
    assert list(small) == ["SFM", "LGM", "CLP-DD", "ours"] and small["SFM"] == {"augs": r.augs, "ema": r.ema}
    assert small["LGM"] == {"method": "lgm", "augs": 3} and small["ours"]["method"] == "sfm+unrolled"
    large = experiments.comparison_methods(r, large=True)
    assert list(large)[0] == "SFM + sub-class" and all(kw["augs"] == 1 for kw in large.values())
    assert large["SFM + sub-class"] == {"augs": 1, "ema": r.ema, "subclass": True}
    assert large["ours + sub-class"]["method"] == "sfm+unrolled" and large["ours + sub-class"]["subclass"]
    assert {large["LGM"]["method"], large["CLP-DD"]["method"]} == {"lgm", "clp"}


def test_the_recorded_comparisons_are_in_chapter_4s_setting():
    """Chapter 4 shows each results/comparison/*.json only where its setting equals the chapter's: a change of
    its defaults, the recipe, the methods or ours' refinement must come with new recordings
    (scripts/record_comparison.py). Every recording is one the chapter shows: its IPC 1 or larger IPC
    comparison, or a longer run named in ``long_runs``."""
    import json
    from pathlib import Path

    import papermill as pm

    from sfm_lib import recipes

    root = Path(__file__).resolve().parents[1]
    chapter = pm.inspect_notebook(str(root / "book" / "04_vs_gradient_matching.ipynb"))
    d = {k: eval(v["default"]) for k, v in chapter.items()}
    run = recipes.run(d["recipe"], d["recipe_overrides"], steps=d["steps"], crop=d["crop"],
                      two_pass=d["two_pass"] or None, chunk_size=d["chunk_size"])  # the chapter's run
    assert d["recorded"]
    shown = {(1, d["steps"]), (d["ipc_large"], d["steps_methods_large"]), *map(tuple, d["long_runs"])}
    files = sorted((root / "results" / "comparison").glob("*.json"))
    found = set()
    for path in files:
        got = json.loads(path.read_text())["setting"]
        assert got["recipe"] == run.at_steps(got["steps"]).describe(), path.name  # its own steps
        assert (got["dataset"], got["backbone"], got["resolution"]) == (d["dataset"], d["backbone"],
                                                                         d["resolution"])
        assert got["distill_seeds"] == d["distill_seeds"] and got["refine"] == experiments.refinement()
        assert (got["probe_seeds"], got["epochs"], got["views"]) == (d["probe_seeds"], d["epochs"], d["views"])
        every = json.loads(json.dumps(experiments.comparison_methods(run.recipe, lgm_augs=d["lgm_augs"],
                                                                     large=got["ipc"] > 1)))
        assert list(got["methods"])[0] == list(every)[0]  # SFM first: the clock of equal time
        assert got["methods"] == {m: every[m] for m in got["methods"]}, path.name
        if (got["ipc"], got["steps"]) in {(1, d["steps"]), (d["ipc_large"], d["steps_methods_large"])}:
            assert got["methods"] == every  # the chapter's own tables have every method
        rows = experiments.recorded_comparison(setting=got)
        assert len(rows) == 2 * len(got["methods"]) * len(d["distill_seeds"])
        assert list(dict.fromkeys(rows["method"])) == list(got["methods"])
        found.add((got["ipc"], got["steps"]))
    assert found == shown


def test_recorded_or_run_shows_the_recording_of_its_setting_and_runs_anything_else(ctx, tmp_path, monkeypatch):
    import pandas as pd

    from sfm_lib import recipes

    run = recipes.run("fmnist-lite0-64", {}, steps=200)
    methods = {"SFM": {"augs": 2}}
    probe = dict(probe_seeds=[0, 1], epochs=5, views=2)
    table = pd.DataFrame({"method": ["SFM"], "comparison": ["equal steps"], "top1_mean": [70.0]})
    key = experiments.comparison_setting(ctx, run, ipc=1, steps=200, distill_seeds=[0], methods=methods, **probe)
    assert key["refine"] == experiments.refinement() and key["steps"] == 200 and key["methods"] == methods
    assert "methods" not in experiments.comparison_setting(ctx, run, ipc=1, steps=200, distill_seeds=[0], **probe)
    experiments.write_recording(str(tmp_path / "ipc1.json"), table, key, ["python", "scripts/record_comparison.py"])
    ran = []
    monkeypatch.setattr(experiments, "method_comparison", lambda *a, **kw: ran.append(kw) or pd.DataFrame())
    got = experiments.recorded_or_run(ctx, run, methods, ipc=1, steps=200, distill_seeds=[0], folder=str(tmp_path),
                                      **probe)
    assert got["top1_mean"].tolist() == [70.0] and got.attrs["command"] == "python scripts/record_comparison.py"
    assert not ran
    for other in (dict(steps=300), dict(recorded=False)):  # another setting, or the recording turned off
        got = experiments.recorded_or_run(ctx, run, methods, **{"ipc": 1, "steps": 200, **other},
                                          distill_seeds=[0], folder=str(tmp_path), **probe)
        assert got.empty and not got.attrs and ran[-1]["steps"] == other.get("steps", 200)
    assert len(ran) == 2 and ran[0]["probe_seeds"] == [0, 1]


def test_a_recording_is_written_as_the_readers_read_it(tmp_path):
    import json

    import pandas as pd

    table = pd.DataFrame({"method": ["SFM", "ours"], "comparison": ["equal steps"] * 2, "top1_mean": [70.123456, 74.0],
                          "steps": [300, 300]})
    path = tmp_path / "sub" / "ipc1.json"
    experiments.write_recording(str(path), table, {"ipc": 1}, ["python", "scripts/x.py", "--methods", "SFM,ours x"])
    record = json.loads(path.read_text())
    assert record["command"] == "python scripts/x.py --methods 'SFM,ours x'" and "CPU core" in record["machine"]
    assert record["setting"] == {"ipc": 1} and record["rows"][0] == {"method": "SFM", "comparison": "equal steps",
                                                                      "top1_mean": 70.1235, "steps": 300}
    got = experiments.recorded_comparison(str(tmp_path / "sub"), setting={"ipc": 1})
    assert got["method"].tolist() == ["SFM", "ours"] and got.attrs["command"] == record["command"]
