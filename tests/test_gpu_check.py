"""scripts/gpu_check.py: the one GPU check runs whole on the CPU at tiny sizes (so a first GPU run cannot fail for
a reason the CPU would have shown), keeps going past a failing check, and runs chapters papermill's way."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
CHECKS = ["bench_step", "bench_methods", "two_pass_in1k", "bench_stats_jpeg", "torchrun", "chapter_01", "chapter_02"]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gc = _module()


@pytest.mark.slow
def test_the_whole_check_runs_on_the_cpu(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(tmp_path), "--budget", "600"],
                         capture_output=True, text=True, timeout=900)
    reports = list(tmp_path.glob("gpu-check-*.json"))
    assert len(reports) == 1, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(reports[0].read_text())
    assert report["command"].endswith(f"--device cpu --out {tmp_path} --budget 600")
    assert report["gpu"] == "cpu" and report["sizes"]["name"] == "tiny" and not report["judged"]
    assert set(report["versions"]) >= {"python", "torch", "timm", "torchvision"}
    assert [c["name"] for c in report["checks"]] == CHECKS
    broken = {c["name"]: c.get("reason") for c in report["checks"] if c["status"] not in ("ok", "pass")}
    assert not broken, broken
    for check in report["checks"]:
        assert check["result"] and check["wall_s"] > 0 and all(c["rc"] == 0 for c in check["commands"])
        skipped = [t["target"] for t in check["targets"] if t["verdict"].startswith("skipped")]
        assert skipped == (["peak / (params+grads+Adam) ≤ 1.15x"] if check["name"] == "two_pass_in1k" else [])
    two_pass = report["checks"][CHECKS.index("two_pass_in1k")]["result"]
    assert two_pass["levels"] == len(two_pass["sizes"]) and two_pass["levels_per_step"][-2:] == [two_pass["levels"]] * 2
    assert report["checks"][CHECKS.index("torchrun")]["result"]["stats"]["world_size"] == 2  # gloo, 2 processes
    assert run.returncode == 0 and all(name in run.stdout for name in CHECKS)  # the table


def test_a_failing_check_is_recorded_with_its_output_and_the_next_one_runs(tmp_path):
    log = tmp_path / "log"
    fail = gc.Check("fails", [[sys.executable, "-c", "print('the cause'); raise SystemExit(3)"]], tmp_path / "x.json",
                    str, limit=60)
    out = tmp_path / "ok.json"
    good = gc.Check("works", [[sys.executable, "-c", f"open({str(out)!r}, 'w').write('{{\"v\": 0.5}}')"]], out,
                    lambda r: f"v {r['v']}", [gc.Target("v", lambda r: r["v"], "<=", 1.0)], limit=60)
    env = gc._env(tmp_path)
    records = [gc.run_check(c, env, log, time.perf_counter() + 120, "cpu", judged=True) for c in (fail, good)]
    assert records[0]["status"] == "error" and "the cause" in records[0]["reason"]
    assert records[0]["commands"][0]["rc"] == 3 and records[0]["result"] is None
    assert records[1]["status"] == "pass" and records[1]["targets"][0]["value"] == 0.5
    text = gc.table(records)
    assert "fails" in text and "the cause" in text and "v 0.5" in text


def test_a_check_past_its_limit_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "pid"
    sleeper = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
               f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    check = gc.Check("slow", [[sys.executable, "-c", sleeper]], tmp_path / "x.json", str, limit=3)
    t0 = time.perf_counter()
    record = gc.run_check(check, gc._env(tmp_path), tmp_path / "log", time.perf_counter() + 60, "cpu", judged=False)
    assert record["status"] == "timeout" and record["commands"][0]["rc"] is None
    assert time.perf_counter() - t0 < 15
    pid = int(pid_file.read_text())
    for _ in range(50):  # the kill is delivered at once; the process may take a moment to go
        if not _running(pid):
            break
        time.sleep(0.1)
    assert not _running(pid), "the check's grandchild outlived the check"


def _running(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_targets_are_judged_only_at_gpu_sizes_and_cuda_figures_only_on_cuda():
    step = gc.Target("SFM step", lambda r: r["s"], "<=", 0.02, " s")
    assert step.verdict({"s": 0.03}, "cuda", judged=True)["verdict"] == "fail"
    assert step.verdict({"s": 0.01}, "cuda", judged=True)["verdict"] == "pass"
    assert step.verdict({"s": 0.03}, "cpu", judged=False)["verdict"] == "not judged (tiny sizes)"
    assert step.verdict({}, "cuda", judged=True)["verdict"] == "not available"
    peak = gc.Target("peak", lambda r: r["p"], "<=", 1.15, needs_cuda=True)
    assert peak.verdict({"p": None}, "cpu", judged=False)["verdict"] == "skipped: needs CUDA"
    assert gc._plain({"a": float("nan"), "b": [1.5, float("inf")]}) == {"a": None, "b": [1.5, None]}


def _notebook(path: Path, cells: list[tuple[str, list[str]]]) -> Path:
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": tags}, "source": src, "outputs": []}
                    for src, tags in cells] + [{"cell_type": "markdown", "metadata": {}, "source": "# text"}]}
    path.write_text(json.dumps(nb))
    return path


def test_a_notebook_runs_with_its_parameters_injected_and_skipped_cells_left_out(tmp_path, capsys):
    nb = _notebook(tmp_path / "nb.ipynb", [
        ("raise RuntimeError('a Colab cell')", ["skip-execution"]),
        ("steps: int = 1  # how many\ndevice: str = 'auto'", ["parameters"]),
        ("import matplotlib.pyplot as plt\nassert (steps, device) == (4, 'auto')\nplt.plot([0, steps])\nplt.show()",
         []),
        ("plt.figure()\nplt.plot([1])", []),  # drawn at the cell's end, as in a notebook
        ("{'shown': steps * 2}", []),
    ])
    counts = gc.run_notebook(nb, {"steps": 4})
    assert (counts["cells_run"], counts["cells_skipped"], counts["figures"]) == (4, 1, 2)
    assert "{'shown': 8}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not parameters of the chapter: resolution"):
        gc.run_notebook(nb, {"resolution": 32})


def test_the_book_chapters_declare_the_injected_parameters():
    for name, notebook in gc._CHAPTERS.items():
        cells = json.loads((ROOT / "book" / notebook).read_text())["cells"]
        source = "".join(next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))["source"])
        assert set(gc.TINY.chapter_params[name]) | {"device"} <= set(gc.declared_parameters(source))


def test_the_fashion_standin_loads_as_fashion_mnist(tmp_path, monkeypatch):
    from sfm_lib import data

    gc.fashion_standin(tmp_path, train_per_class=3, test_per_class=2)
    monkeypatch.setenv("SFM_DATA", str(tmp_path))
    test = data.load("fashion_mnist", "test")
    assert len(test) == 20 and test.images.shape[1:] == (28, 28) and test.targets.bincount().tolist() == [2] * 10


def test_an_unknown_check_name_says_which_names_exist(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--only", "bench_step,nope", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and not list(tmp_path.iterdir())
    assert "unknown check(s) nope; choose from bench_step, bench_methods" in run.stderr.strip().splitlines()[-1]


def test_a_check_after_the_budget_is_spent_is_reported_not_run(tmp_path):
    check = gc.Check("late", [[sys.executable, "-c", "pass"]], tmp_path / "x.json", str, limit=60)
    record = gc.run_check(check, gc._env(tmp_path), tmp_path / "log", time.perf_counter(), "cpu", judged=False)
    assert record["status"] == "not run" and "--budget" in record["reason"] and not record["commands"]
