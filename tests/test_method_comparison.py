"""experiments.method_comparison: equal steps and equal wall time, on a fake clock and fake runs."""
from __future__ import annotations

import time

import pytest
import torch

from sfm_lib import evaluate, experiments
from sfm_lib.data import DistilledSet


class _FakeImages:
    def __init__(self, value: float):
        self.value = value

    def decode(self) -> torch.Tensor:
        return torch.full((2, 3, 4, 4), self.value)


@pytest.fixture
def fake_world(monkeypatch):
    """A clock that only moves when a fake run spends ``cost`` seconds per step; the images after step k
    hold the value k; a probe scores images by their mean value."""
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    calls = []

    def distilled(ctx, *, steps, cost=1.0, callback=None, **kw):
        calls.append({"steps": steps, "cost": cost, **kw})
        for step in range(steps):
            now[0] += cost
            if callback is not None:
                callback(step, 0.0, _FakeImages(step + 1.0))
        return DistilledSet(torch.full((2, 3, 4, 4), float(steps)), torch.arange(2), ["a", "b"],
                            {"steps": steps})

    def probe(backbone, result, test, resolution, *, epochs, seeds, views, transform=None):
        return evaluate.ProbeResult([float(result.images.mean())] * len(seeds), list(seeds))

    monkeypatch.setattr(experiments, "distilled", distilled)
    monkeypatch.setattr(evaluate, "linear_probe", probe)
    ctx = experiments.Context(None, None, None, None, 8)
    return ctx, calls


def test_equal_time_cuts_slower_methods_at_the_reference_budget(fake_world):
    ctx, calls = fake_world
    methods = {"ref": {"cost": 1.0}, "slow": {"cost": 2.5}, "fast": {"cost": 0.5}, "too slow": {"cost": 7.0}}
    df = experiments.method_comparison(ctx, methods, steps=6, distill_seeds=(0, 1), probe_seeds=(0, 1),
                                       base={"init": "real"})
    assert len(df) == 4 * 2 * 2
    assert all(c["init"] == "real" for c in calls)
    got = df.set_index(["method", "comparison", "distill_seed"])
    for seed in (0, 1):
        assert got.loc[("ref", "equal steps", seed), "steps"] == 6
        assert got.loc[("ref", "equal time", seed), "time_s"] == 6.0
        # 2.5 s a step within the reference's 6 s: two steps, ended at 5 s; their images score 2
        assert got.loc[("slow", "equal steps", seed)][["steps", "time_s", "top1_mean"]].tolist() == [6, 15.0, 6.0]
        assert got.loc[("slow", "equal time", seed)][["steps", "time_s", "top1_mean"]].tolist() == [2, 5.0, 2.0]
        # faster than the reference: its full run
        assert got.loc[("fast", "equal time", seed)][["steps", "time_s", "top1_mean"]].tolist() == [6, 3.0, 6.0]
        # no step fits: the start images (a 0-step run)
        assert got.loc[("too slow", "equal time", seed)][["steps", "top1_mean"]].tolist() == [0, 0.0]
    assert sorted(df.distill_seed.unique()) == [0, 1] and (df.ipc == 1).all()


def test_method_comparison_needs_methods(fake_world):
    ctx, _ = fake_world
    with pytest.raises(ValueError, match="methods is empty"):
        experiments.method_comparison(ctx, {})


def test_recorded_costs_reads_bench_methods_results_only(tmp_path):
    import json

    run = {"runs": {"sfm_A1": {"median_s": 0.04, "peak_gib": 7.0}}, "ratios": {"time": 13.2, "memory": 8.9},
           "device": "cuda", "gpu": "NVIDIA H200", "command": "python -m sfm_lib bench methods"}
    (tmp_path / "h200.json").write_text(json.dumps(run))
    (tmp_path / "other.json").write_text(json.dumps({"top1": [1.0]}))
    (tmp_path / "broken.json").write_text("{")
    assert experiments.recorded_costs(str(tmp_path)) == {"NVIDIA H200 (h200.json)": run}
    assert experiments.recorded_costs(str(tmp_path / "missing")) == {}


def test_recorded_full_data_reads_full_probe_results_only(tmp_path):
    import json

    def result(views, epochs, top1, kind="full"):
        return {"top1": [top1], "top1_mean": top1, "seeds": [0],
                "meta": {"kind": kind, "views": views, "epochs": epochs, "scored_on": "val"}}

    (tmp_path / "b.json").write_text(json.dumps(result(4, 30, 88.1)))
    (tmp_path / "a.json").write_text(json.dumps(result(1, 30, 88.9)))
    (tmp_path / "random.json").write_text(json.dumps(result(1, 30, 50.0, kind="random")))
    (tmp_path / "other.json").write_text(json.dumps({"runs": {}}))
    (tmp_path / "broken.json").write_text("{")
    table = experiments.recorded_full_data(str(tmp_path))
    assert table[["views", "top1", "file"]].values.tolist() == [[1, 88.9, "a.json"], [4, 88.1, "b.json"]]
    assert list(experiments.recorded_full_data(str(tmp_path / "missing")).columns)[:2] == ["views", "epochs"]
    assert len(experiments.recorded_full_data()) == 3  # the committed results/full_data_views/


def test_summarise_comparison_averages_over_distillation_seeds():
    import pandas as pd

    rows = [("SFM", "equal steps", 0, 70.0, 0.2, 72.0, 300, 10.0), ("SFM", "equal steps", 1, 72.0, 0.4, 73.0, 300, 12.0),
            ("LGM", "equal steps", 0, 60.0, 1.0, 61.0, 300, 30.0), ("LGM", "equal steps", 1, 66.0, 3.0, 65.0, 300, 34.0),
            ("LGM", "equal time", 0, 58.0, 1.0, 59.0, 100, 10.0), ("LGM", "equal time", 1, 62.0, 1.0, 61.0, 120, 12.0)]
    acc = pd.DataFrame(rows, columns=["method", "comparison", "distill_seed", "top1_mean", "top1_std",
                                      "val_top1_mean", "steps", "time_s"])
    summary = experiments.summarise_comparison(acc, random_top1=50.0)
    assert list(summary.index) == [("equal steps", "SFM"), ("equal steps", "LGM"), ("equal time", "LGM")]
    lgm = summary.loc[("equal steps", "LGM")]
    assert lgm.top1 == 63.0 and lgm.val_top1 == 63.0 and lgm.probe_std == 2.0 and lgm.time_s == 32.0
    assert lgm.seed_std == pytest.approx((2 * 3.0 ** 2) ** 0.5)  # sample std of (60, 66)
    assert summary.loc[("equal time", "LGM")].steps == 110.0
    assert summary["gain_over_random"].tolist() == [21.0, 13.0, 10.0]


def test_recorded_refinement_summarises_the_seeds_of_each_variant(tmp_path):
    import json

    rows = [{"variant": "sfm", "distill_seed": 0, "val_top1": 72.0, "top1": 71.0},
            {"variant": "sfm", "distill_seed": 1, "val_top1": 74.0, "top1": 73.0},
            {"variant": "ours", "distill_seed": 0, "val_top1": 76.0, "top1": 75.0}]
    (tmp_path / "ipc1.json").write_text(json.dumps({"ipc": 1, "steps": 500, "command": "c1", "machine": "m1",
                                                    "rows": rows}))
    # the same variant name at other steps (another file, another machine) is another row
    (tmp_path / "ipc1-longer.json").write_text(json.dumps({"ipc": 1, "steps": 900, "command": "c2", "machine": "m2",
                                                           "rows": [{**rows[0], "val_top1": 70.0}]}))
    (tmp_path / "other.json").write_text(json.dumps({"runs": {}}))
    (tmp_path / "ipc1-x.json").write_text(json.dumps({"ipc": 1, "rows": [], "feature_rows": [
        {"rows": "class means", "val_top1": 74.5}, {"rows": "whitened", "kappa": 1, "val_top1": 79.0}]}))
    table = experiments.recorded_refinement(str(tmp_path))
    assert list(table.index) == [(1, 900, "sfm"), (1, 500, "sfm"), (1, 500, "ours")]  # files by name
    assert table.attrs["feature_rows"] == {"class means": 74.5, "whitened": 79.0}
    assert table.attrs["sources"]["ipc1"] == {"command": "c1", "machine": "m1"}
    assert table.attrs["sources"]["ipc1-longer"] == {"command": "c2", "machine": "m2"}
    assert set(table.attrs["sources"]) == {"ipc1", "ipc1-longer"}  # no rows: no source
    sfm = table.loc[(1, 500, "sfm")]
    assert (sfm.val_top1, sfm.top1, sfm.seeds, sfm.file) == (73.0, 72.0, 2, "ipc1")
    assert sfm.val_std == pytest.approx(2 ** 0.5)
    assert table.loc[(1, 900, "sfm")].val_top1 == 70.0 and table.loc[(1, 900, "sfm")].file == "ipc1-longer"
    assert experiments.recorded_refinement(str(tmp_path / "missing")).empty
