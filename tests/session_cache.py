"""Inputs that several test files need, built once per pytest session. pytest.ini runs the files side by
side in xdist workers: the first worker to ask builds under a file lock, the others wait and reuse it.
Tests must not modify what they get."""
from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the step scripts, for their main(argv)

# The built-in sample's test events: one seed and one seed block per process (one Pythia initialisation)
GENERATED_EVENTS = {"hzz4l": 300, "zz4l": 250, "ttbar": 200, "dy": 600}
GENERATED_SEED = 7


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name`, filled by build(folder) once per session."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed in another worker
            folder.mkdir()
            build(folder)
            (folder / ".complete").touch()
    return folder


def generated(tmp_path_factory, process: str) -> Path:
    """step0's ROOT file of GENERATED_EVENTS[process] events."""
    import step0_generate

    def build(folder: Path) -> None:
        n = str(GENERATED_EVENTS[process])
        assert step0_generate.main(["--process", process, "--events", n, "--seed", str(GENERATED_SEED), "--block", n,
                                    "--workers", "1", "--out", str(folder / f"{process}.root")]) == 0

    return built_once(tmp_path_factory, f"step0_{process}", build) / f"{process}.root"
