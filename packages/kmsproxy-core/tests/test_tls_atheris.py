"""The atheris fuzz target (`fuzz/fuzz_tls.py`) on a short budget, starting
from the inputs in `fuzz/seeds` and `fuzz/regressions`.

A crashing input that fuzzing finds goes into `fuzz/regressions` (created
with its first file), so every later run replays it.

Each run is a subprocess, because atheris instruments modules as they are
imported and pytest has imported them already. `nox -s fuzz` runs longer.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

FUZZ_DIRECTORY = Path(__file__).resolve().parent.parent / "fuzz"
FUZZ_TARGET = FUZZ_DIRECTORY / "fuzz_tls.py"
SEEDS = FUZZ_DIRECTORY / "seeds"
REGRESSIONS = FUZZ_DIRECTORY / "regressions"

# Fuzzing budget of the default test run, in seconds: enough for some 50,000
# inputs on a 2-core machine (an estimate from one run), short enough for
# every test run.
FUZZ_SECONDS = 15

# Start-up (imports, instrumentation, key generation) plus the budget. Start-up
# takes a few seconds; 60 s of slack only turns a hang into a failure.
FUZZ_TIMEOUT_SECONDS = FUZZ_SECONDS + 60

_DONE = re.compile(r"Done (\d+) runs")


def run_target(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(FUZZ_TARGET),
            f"-artifact_prefix={tmp_path}/",
            *arguments,
        ],
        capture_output=True,
        text=True,
        timeout=FUZZ_TIMEOUT_SECONDS,
        cwd=tmp_path,
        check=False,
    )


def test_fuzz_finds_no_crash(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # libFuzzer first runs every file of the corpus directories, so the seeds
    # and regression inputs are replayed before fuzzing starts.
    directories = [str(d) for d in (corpus, SEEDS, REGRESSIONS) if d.is_dir()]
    result = run_target(tmp_path, f"-max_total_time={FUZZ_SECONDS}", *directories)
    crashes = sorted(path.name for path in tmp_path.glob("crash-*"))
    done = _DONE.search(result.stderr)
    assert result.returncode == 0, result.stderr[-4000:]
    assert crashes == []
    assert done is not None, result.stderr[-4000:]
    assert int(done.group(1)) > len(list(SEEDS.iterdir()))
