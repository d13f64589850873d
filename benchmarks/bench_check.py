"""Section `check`: the pipeline's correctness tests on this machine's decoder, before its speed is trusted.

Runs tests/test_pipeline.py with NVDEC on H.264 and on VP9 shards (`MAE_ST_TEST_DECODE=gpu`,
`MAE_ST_TEST_CODEC=...`); on a machine without a GPU, the CPU/VP9 run the suite does by default.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from benchmarks.harness import REPO, SectionContext, child_env, resolve_device

TEST_FILE = "tests/test_pipeline.py"
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped)")


def run_check(ctx: SectionContext) -> None:
    if importlib.util.find_spec("pytest") is None:
        raise RuntimeError("pytest is not installed on this machine; carry its wheels (pytest, pluggy, iniconfig, "
                           "packaging, pygments) with the others, e.g. EXTRA_WHEELS for shared/device/pack.sh")
    on_gpu = resolve_device(ctx.device).type == "cuda"
    runs = [("gpu", "h264"), ("gpu", "vp9")] if on_gpu else [("cpu", "vp9")]
    for decode, codec in runs:
        ctx.measure({"decode": decode, "codec": codec}, lambda: run_tests(ctx, decode, codec))


def run_tests(ctx: SectionContext, decode: str, codec: str) -> dict:
    """One pytest run of TEST_FILE; the row holds the pass/fail counts and the names of failed tests."""
    env = dict(child_env(), MAE_ST_TEST_DECODE=decode, MAE_ST_TEST_CODEC=codec)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST_FILE]
    log = Path(ctx.out_dir) / f"check_{decode}_{codec}.log"
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(ctx.seconds_left() - 5, 1))
        output, returncode = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        output, returncode = _text(err.stdout) + _text(err.stderr) + "\n[timed out]", "timeout"
    log.write_text(output)
    return {**summary_counts(output), "rc": returncode,
            "seconds": time.perf_counter() - started, "failed tests": failed_tests(output), "log": str(log)}


def summary_counts(output: str) -> Dict[str, int]:
    """pytest's final "N passed, M failed in Xs" line as counts (0 for kinds it does not mention)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    lines = [line for line in output.splitlines() if " in " in line and _COUNT.search(line)]
    for number, kind in _COUNT.findall(lines[-1] if lines else ""):
        counts["errors" if kind.startswith("error") else kind] += int(number)
    return counts


def failed_tests(output: str) -> List[str]:
    return [line.split(" ", 1)[1].split(" - ")[0] for line in output.splitlines()
            if line.startswith(("FAILED ", "ERROR "))]


def _text(raw) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else (raw or "")
