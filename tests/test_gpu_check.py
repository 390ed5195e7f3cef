"""``benchmarks/gpu_check.sh``: its CPU form end to end (so the GPU check cannot rot where CI has
no GPU), the one-process-per-part runner used with CUDA (a part's rows, a part over its time cap
killed and reported) and the reading of the GPU tests' JUnit XML."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", I2E_ROOT=str(tmp_path))
    env.pop("OUT", None)
    return env


def _rows(out: Path) -> dict[str, list[dict]]:
    by_part: dict[str, list[dict]] = {}
    for r in json.loads((out / "gpu_check.json").read_text())["rows"]:
        by_part.setdefault(r["part"], []).append(r)
    return by_part


@pytest.mark.slow
def test_cpu_form_runs_every_part_and_writes_the_table(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu", "--python", sys.executable, "--out", str(out)], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = (out / "gpu_check.md").read_text()
    assert table.startswith("# GPU check (cpu, reduced sizes)") and "| part | check | result | status |" in table
    assert "| FAILED |" not in table and (out / "gpu_check.log").is_file()
    parts = _rows(out)
    assert [r["status"] for r in parts["gpu_tests"] + parts["train_compile"]] == ["skipped", "skipped"]
    assert all(r["result"] == "skipped: no CUDA" for r in parts["gpu_tests"] + parts["train_compile"])
    equal = [r for r in parts["convert"] if r["check"].startswith("eval == official")]
    assert len(equal) == 4 and all(r["status"] == "PASS" for r in equal)  # 2 sizes x (numba, torch)
    assert sum("ms/img" in r["result"] for r in parts["convert"]) == 8  # 4 contenders x 2 sizes, timed
    assert [r["status"] for r in parts["loader"]] == ["PASS", "info", "info"]
    ours = [r for r in parts["train_step"] if "ours, default path" in r["check"]]
    assert ours[0]["status"] == "PASS" and ours[0]["loss_deltas"] == [0.0, 0.0, 0.0]  # bit-identical on CPU
    runs, falls, syncs = parts["train_run"]  # it ran, the loss falls, host synchronisation (CPU: information)
    assert runs["status"] == falls["status"] == "PASS" and len(falls["losses"]) == 20
    assert falls["check"].startswith("the loss falls") and syncs["status"] == "info"


@pytest.fixture(scope="module")
def driver():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_part_in_its_own_process(driver, tmp_path):
    args = driver.parse_args(["--cpu", "--out", str(tmp_path)])
    rows = driver.run_isolated("loader", args, cap=240.0, work=tmp_path, log=tmp_path / "log")
    assert [r["status"] for r in rows] == ["PASS", "info", "info"], rows
    assert "part loader" in (tmp_path / "log").read_text()  # the child's output goes to the log


def test_a_part_over_its_cap_is_killed_and_named(driver, tmp_path):
    args = driver.parse_args(["--cpu", "--out", str(tmp_path)])
    rows = driver.run_isolated("train_step", args, cap=2.0, work=tmp_path, log=tmp_path / "log")
    assert rows[-1]["status"] == "FAILED" and rows[-1]["result"] == "timed out after its cap of 2 s"


def test_gpu_test_results_become_rows(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_a" time="1.5"/>'
        '<testcase classname="tests.test_gpu" name="test_b" time="0.1"><failure message="assert 1 == 2">tb'
        '</failure></testcase>'
        '<testcase classname="tests.test_gpu" name="test_c" time="0"><skipped message="needs a CUDA device"/>'
        '</testcase></testsuite></testsuites>')
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu_check_parts import junit_rows
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rows = junit_rows(xml)
    assert [(r["check"], r["status"], r["result"]) for r in rows] == [
        ("test_gpu::test_a", "PASS", "passed in 1.5 s"),
        ("test_gpu::test_b", "FAILED", "assert 1 == 2"),
        ("test_gpu::test_c", "skipped", "needs a CUDA device")]
