"""Reproduction presets and the `repro` runner: presets name only chapter parameters, unknown keys are refused
before anything runs, record() writes what the runner collects, and a run killed inside a chapter resumes
by skipping the finished ones.

The end-to-end test runs chapters 01 and 02 with the tiny preset (about a minute); chapter 03 with tiny
parameters takes ~5 minutes on a shared 2-core machine and is covered by tests/test_notebooks.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from sfm_lib import cli, recipes, repro

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def declared():
    return repro.chapter_parameters(repro.chapters(ROOT))


def test_every_preset_holds_only_chapter_parameters_with_their_types(declared):
    """Each key is a parameter of some chapter, and its value has the type that chapter declares."""
    kinds = {"int": int, "float": (int, float), "str": str, "bool": bool, "list[int]": list, "list[str]": list,
             "dict": dict, "list": list}
    assert {"tiny", "cpu-default"} <= set(repro.presets(ROOT))
    for name in repro.presets(ROOT):
        _, params = repro.load_preset(name, ROOT)
        repro.check_keys(params, declared)
        for key, value in params.items():
            types = {d[key]["inferred_type_name"] for d in declared.values() if key in d}
            assert all(isinstance(value, kinds[t]) for t in types), (name, key, value, types)


def test_the_papers_presets_cover_the_papers_settings():
    names = set(repro.presets(ROOT))
    timm = {"dinov2": "vit_base_patch14_dinov2.lvd142m", "clip": "vit_base_patch16_clip_224.openai",
            "eva02": "eva02_base_patch14_224.mim_in22k"}
    for ds, folder in [("in100", "imagenet100"), ("in1k", "imagenet1k")]:
        for short, model in timm.items():
            for ipc in (1, 10):
                _, p = repro.load_preset(f"{ds}-{short}-ipc{ipc}", ROOT)
                names.discard(f"{ds}-{short}-ipc{ipc}")
                assert p["dataset"] == f"imagefolder:/path/to/{folder}" and p["backbone"] == model
                assert p["ipc"] == ipc and p["steps"] == 5000 and p["recipe"] == "paper"
                assert (p["resolution"], p["crop"], p["pretrained"]) == (256, 224, True)
                assert p["test_transform"] == "paper"  # Resize(256) -> CenterCrop(224), as the papers test
                assert p["probe_seeds"] == [3407, 3408, 3409, 3410, 3411]  # the papers' five probes
                assert p["two_pass"] is (ds == "in1k" and ipc == 10)
                assert set(p["eval_backbones"]) == set(timm.values()) - {model}
                assert p["lgm_augs"] == (3 if ds == "in1k" else 10)
                if p["ipc_large"]:  # chapter 4 compares the methods at IPC 10 for the run's own steps
                    assert p["steps_methods_large"] == p["steps"]
    assert names == {"tiny", "cpu-default"}


def _chapter_values(notebook: Path, preset: dict) -> dict:
    """A chapter's parameters as papermill would set them: its defaults, then the preset's keys it declares."""
    import papermill as pm

    declared = pm.inspect_notebook(str(notebook))
    return {**{k: eval(v["default"]) for k, v in declared.items()}, **{k: v for k, v in preset.items() if k in declared}}


def test_every_chapter_builds_the_config_of_distill_preset_paper_for_every_imagenet_preset():
    """Field by field: the DistillConfig a chapter builds from an ImageNet preset (recipes.run of its recipe
    parameters, the way every distilling chapter calls it) equals the one `distill --preset paper` builds
    for the same setting (ipc, 256 px images, 224 px crops, two-pass as the preset says)."""
    import dataclasses

    from sfm_lib import distill

    def comparable(config):
        return {k: v for k, v in dataclasses.asdict(config).items() if k not in ("checkpoint", "progress")}

    distilling = [nb for nb in repro.chapters(ROOT) if "recipes.run(recipe, recipe_overrides" in nb.read_text()]
    assert [nb.stem[:2] for nb in distilling] == ["02", "03", "04", "05"]
    for name in repro.presets(ROOT):
        if not name.startswith("in"):
            continue
        _, preset = repro.load_preset(name, ROOT)
        argv = ["distill", "--preset", "paper", "--stats", "s", "--out", "o", "--ipc", str(preset["ipc"]),
                "--resolution", "256", "--crop", "224"] + (["--two-pass"] if preset["two_pass"] else [])
        a = cli.build_parser().parse_args(argv)
        expected = comparable(distill._config(cli._distill_kwargs(a)))
        assert expected["lr"] == 2e-3 and expected["param"] == "pyramid" and expected["crop"] == 224
        for nb in distilling:
            v = _chapter_values(nb, preset)
            run = recipes.run(v["recipe"], v["recipe_overrides"], steps=v["steps"], crop=v["crop"],
                              two_pass=v["two_pass"] or None, chunk_size=v["chunk_size"])
            kwargs = {**run.sfm_kwargs(), "ipc": v["ipc"] if "ipc" in v else preset["ipc"],
                      "resolution": v["resolution"], "seed": 0}
            assert comparable(distill._config(kwargs)) == expected, (name, nb.stem)


def test_the_cpu_default_preset_is_the_chapters_defaults(declared):
    _, params = repro.load_preset("cpu-default", ROOT)
    for chapter, d in declared.items():
        for key, value in params.items():
            assert key not in d or eval(d[key]["default"]) == value, (chapter, key)


def test_the_tiny_preset_is_the_notebook_tests_values():
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_notebooks import CHAPTERS, TINY
    finally:
        sys.path.pop(0)
    _, tiny = repro.load_preset("tiny", ROOT)
    for chapter, values in CHAPTERS.items():
        for key, value in {**TINY, **values}.items():
            assert key == "steps" or tiny[key] == value, (chapter, key)
    assert tiny["steps"] <= min(v.get("steps", 10 ** 9) for v in CHAPTERS.values())


def test_unknown_keys_are_refused_before_anything_runs(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("resolution: 32\nlearning_rate: 0.1\nstepz: 3\n")
    # --chapters 09 (no such chapter) is checked last: were the check missing, nothing would run either
    assert cli.main(["repro", str(bad), "--out", str(tmp_path / "out"), "--chapters", "09"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown parameters learning_rate, stepz in preset bad")
    assert "papermill --help-notebook" in err and "Traceback" not in err
    assert cli.main(["repro", "tiny", "--out", str(tmp_path / "out"), "-p", "epochz", "3", "--chapters", "09"]) == 2
    assert "unknown parameter epochz given with -p" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_values_of_the_wrong_type_are_refused(tmp_path, capsys, declared):
    # --chapters 09 (no such chapter) is checked last: were the check missing, nothing would run either
    assert cli.main(["repro", "tiny", "--out", str(tmp_path / "o"), "-p", "steps", "many", "-p", "ablations",
                     "loss", "-p", "probe_seeds", "[0, 1]", "-p", "sigmas", "[0, 1]", "--chapters", "09"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: wrong type given with -p: steps = 'many' (02_flow_matching declares int)")
    assert "ablations = 'loss' (03_evaluation declares list[str])" in err
    assert "probe_seeds" not in err and "sigmas" not in err  # a list of ints; ints where floats are declared
    repro.check_types({"download": True, "resolution": 64, "sigmas": [0], "eval_backbones": ["a"]}, declared)
    with pytest.raises(ValueError, match="download = 1"):
        repro.check_types({"download": 1}, declared)
    assert not (tmp_path / "o").exists()


def test_placeholders_unknown_presets_and_chapters_are_refused(tmp_path, capsys):
    assert cli.main(["repro", "in100-dinov2-ipc1", "--out", str(tmp_path / "o")]) == 2
    assert "placeholder paths (dataset: imagefolder:/path/to/imagenet100)" in capsys.readouterr().err
    assert cli.main(["repro", "nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no preset 'nope': give a name among cpu-default, in100-clip-ipc1" in err
    assert cli.main(["repro", "tiny", "--out", str(tmp_path / "o"), "--chapters", "09"]) == 2
    assert "--chapters 09: no such chapter" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_parse_value_reads_yaml_literals():
    assert repro.parse_value("3") == 3 and repro.parse_value("0.5") == 0.5
    assert repro.parse_value("[0, 1]") == [0, 1] and repro.parse_value("[]") == []
    assert repro.parse_value("false") is False and repro.parse_value("cpu") == "cpu"
    assert repro.parse_value("imagefolder:/data/in100") == "imagefolder:/data/in100"


def test_record_writes_rows_only_under_the_runner(tmp_path, monkeypatch):
    df = pd.DataFrame({"method": ["a", "b"], "top1": [1.5, float("nan")]}).set_index("method")
    monkeypatch.delenv(repro.RESULTS_ENV, raising=False)
    assert repro.record("t", df) is df and not list(tmp_path.iterdir())
    monkeypatch.setenv(repro.RESULTS_ENV, str(tmp_path / "tables"))
    assert repro.record("summary", df) is df
    repro.record("row", {"loss": 0.25, "steps": 3})
    repro.record("summary", df.iloc[:1])  # recorded again: replaced, keeps its place
    saved = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "tables").glob("*.json")}
    assert saved["summary"]["rows"] == [{"method": "a", "top1": 1.5}] and saved["summary"]["order"] == 0
    assert saved["row"] == {"name": "row", "order": 1, "rows": [{"loss": 0.25, "steps": 3}]}
    assert repro._tables(tmp_path / "tables") == {"summary": saved["summary"]["rows"], "row": saved["row"]["rows"]}
    with pytest.raises(ValueError, match="table name"):
        repro.record("../x", df)
    with pytest.raises(TypeError, match="record"):
        repro.record("x", 3.0)


def test_the_repro_command_is_documented():
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["repro"].format_help()
    for word in ["PRESET", "--out", "-p KEY VALUE", "--chapters", "results.json"]:
        assert word in help_text


def _wait_for(predicate, timeout, proc):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_killed_run_resumes_and_finishes_end_to_end(tmp_path, session_cache):
    """Start `repro tiny --chapters 01,02`, SIGKILL the process while chapter 02 runs, run again: chapter 01 is
    skipped, 02 runs, and the folder holds both executed notebooks, their figures and results.json with the
    tables the chapters recorded."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sfm_lib", "repro", "tiny", "--out", str(out), "--chapters", "01,02"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        _wait_for(lambda: (out / "done" / "01_statistics.json").is_file()
                  and (out / "02_flow_matching.ipynb").is_file(), 600, first)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        try:  # the chapter's kernel, started by the killed process in its session
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not (out / "done" / "02_flow_matching.json").exists()
    partial = json.loads((out / "results.json").read_text())
    assert list(partial["chapters"]) == ["01_statistics"]

    second = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "[1/2] 01_statistics: finished earlier, skipped" in second.stdout
    assert "[2/2] 02_flow_matching: done" in second.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["preset"] == "tiny" and list(results["chapters"]) == ["01_statistics", "02_flow_matching"]
    ch1, ch2 = results["chapters"]["01_statistics"], results["chapters"]["02_flow_matching"]
    assert ch1["parameters"] == {"resolution": 32, "images_per_class": 20, "device": "cpu"}
    assert ch2["parameters"]["steps"] == 2 and "epochs" not in ch2["parameters"]
    stats_rows = ch1["tables"]["class_statistics"]
    assert len(stats_rows) == 10 and all(r["images"] == 20 for r in stats_rows)
    (run,) = ch2["tables"]["distillation"]
    assert run["steps"] == 2 and run["ema"] == 0.7 and run["final_loss"] > 0
    for chapter in (ch1, ch2):
        assert chapter["figures"] and all((out / f).stat().st_size > 1000 for f in chapter["figures"])
        nb = json.loads((out / chapter["notebook"]).read_text())
        assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert (out / "figures" / "01_statistics-01.png").read_bytes()[:4] == b"\x89PNG"

    third = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and third.stdout.count("finished earlier, skipped") == 2
    changed = subprocess.run(cmd[:-2] + ["--chapters", "01", "-p", "images_per_class", "10"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert changed.returncode == 0 and "parameters changed since the finished run" in changed.stdout
    assert json.loads((out / "results.json").read_text())["chapters"]["01_statistics"]["tables"][
        "class_statistics"][0]["images"] == 10


@pytest.mark.parametrize("preset", ["tiny", "cpu-default", "in1k-eva02-ipc10"])
def test_plain_papermill_injects_a_preset_into_every_chapter(preset):
    """What `papermill CHAPTER out.ipynb -f repro/PRESET.yaml` does before running: every key becomes a
    Python assignment of the YAML value (keys a chapter does not declare are then unused variables)."""
    import ast

    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    _, params = repro.load_preset(preset, ROOT)
    for notebook in repro.chapters(ROOT):
        nb = parameterize_notebook(load_notebook_node(str(notebook)), params)
        (injected,) = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assigned = {}
        for node in ast.parse(injected.source).body:
            assigned[node.targets[0].id] = ast.literal_eval(node.value)
        assert assigned == params, notebook.name
