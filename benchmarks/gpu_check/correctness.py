"""The GPU check's correctness section: the tests marked `cuda` (tests/test_gpu_correctness.py), run by
pytest in a process of its own, one result per test. The checks are tests so that they are written,
read and run like the rest of the suite (`pytest -m cuda` on a GPU machine does the same). Without CUDA
every one of them skips: the section then shows that pytest ran, found them and reported each, the
plumbing a --smoke run can check."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, Optional, Union

from benchmarks.gpu_check.plan import REPO, Plan, launch, tail

TESTS = REPO / "tests" / "test_gpu_correctness.py"
Outcome = Union[dict, str]  # {"ok": True}, {"ok": False, "error": ...}, or "skipped: <reason>"


def outcomes(junit: Path) -> Dict[str, Outcome]:
    """Each test's outcome from pytest's JUnit XML report, by its name without "test_"."""
    results: Dict[str, Outcome] = {}
    for case in ElementTree.parse(junit).iter("testcase"):
        name = case.get("name", "?").removeprefix("test_")
        failed = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if failed is not None:
            message = (failed.get("message") or failed.text or "").strip().splitlines()
            results[name] = {"ok": False, "error": (message[0] if message else "failed")[:300]}
        elif skipped is not None:
            results[name] = f"skipped: {skipped.get('message', '').removeprefix('Skipped: ')}"
        else:
            results[name] = {"ok": True}
    return results


def run_tests(path: Path, marker: str, out: Path, timeout: float, env: Optional[Dict[str, str]] = None
              ) -> Dict[str, Outcome]:
    """pytest on the tests of `path` marked `marker`, its files under `out`, `env` added to its
    environment: each test's outcome. Raises when pytest found none or could not run them (a wrong path
    or marker is not a pass)."""
    out.mkdir(parents=True, exist_ok=True)
    junit = out / "junit.xml"
    junit.unlink(missing_ok=True)
    # PYTEST_ADDOPTS: an outer pytest's options (-n 2, say) are not this run's
    done = launch("pytest", [str(path), "-m", marker, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                             f"--basetemp={out / 'tmp'}"], timeout, env={"PYTEST_ADDOPTS": "", **(env or {})})
    found = outcomes(junit) if junit.is_file() else {}
    if done.returncode not in (0, 1) or not found:  # 1: some failed, reported; 2-5: not run, or none found
        raise RuntimeError(f"pytest ran no test of {path.name} marked {marker} (exit {done.returncode}): "
                           f"{tail(done.stdout, 3)}")
    return found


def correctness(plan: Plan, deadline: float) -> dict:
    """fp16 with a forced overflow, bf16 against fp32, stop + resume bit for bit, a contiguous checkpoint
    into channels_last, data.loader=auto: see tests/test_gpu_correctness.py. A minute past the budget, the
    run is stopped (and the section fails)."""
    # --smoke checks the CPU's plumbing, on a machine with a GPU too: the tests see no CUDA and skip
    hide_gpus = {"CUDA_VISIBLE_DEVICES": ""} if plan.smoke else {}
    results = run_tests(TESTS, "cuda", plan.out / "correctness", deadline - time.monotonic() + 60, hide_gpus)
    return {"ok": all(r["ok"] for r in results.values() if isinstance(r, dict)), **results}
