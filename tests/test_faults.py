"""Fault injection. Each case breaks one input, or the conditions of a run, then runs a step and checks
the exit code (README: 0 ok, 1 some inputs failed, 2 bad usage), the one `error:` line naming the
culprit and its cause, no traceback, no temporary file left, and that every good input still gave a
complete output, the same as a clean run gives.

A step is one entry of STEPS (how to call it, its good inputs, how to compare outputs); a case is one
line of CASES (step, fault, expected code, expected words of the error line). A fault is a function
(Run, tmp folder) -> Run: most are generic (truncation, random bytes, read-only output folder, a
killed run ...) and serve every step.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import uproot

from common.runtime import TEMP_OUTPUT, atomic_output, expand_inputs, process_inputs

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
NANO = DATA / "nanoaod" / "nano_dy.root"
PHYSLITE = DATA / "physlite" / "PHYSLITE_example.root"
RNTUPLE = DATA / "physlite" / "physlite_r25_rntuple.root"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import nano_layouts  # noqa: E402
import step1_convert  # noqa: E402


@dataclass
class Run:
    """What the step is given, and what the checks expect of it."""
    step: str
    inputs: list[Path]  # files or folders, in this order on the command line
    out: Path
    good: dict[Path, Path]  # input -> the real file it copies: its output must equal a clean run's
    culprit: str | None = None  # what the error line must name; None: no error line
    extra: list[str] = field(default_factory=list)  # more arguments
    cleanup: list[Callable] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# steps
# ------------------------------------------------------------------------------------------------
def read_h5(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        out["n_events"] = f["metadata"].attrs["n_events"]
    return out


def same_h5(a, b):
    da, db = read_h5(a), read_h5(b)
    assert da.keys() == db.keys()
    for k in da:
        np.testing.assert_array_equal(da[k], db[k], err_msg=f"{a}: {k}")


@dataclass(frozen=True)
class Step:
    script: str
    main: Callable[[list[str]], int]
    argv: Callable[[Run], list[str]]
    sources: Callable[[Path], list[Path]]  # writes the good inputs of every case into a folder
    victim: Path  # the real file that generic faults break
    output: Callable[[Path, Path], Path]  # (input, out folder) -> its output
    same: Callable[[Path, Path], None]  # asserts two outputs are the same
    slow: tuple[str, ...] = ()  # arguments that make a run last (to kill it while it writes) ...
    slow_source: Path | None = None  # ... on this input


STEPS = {
    "step1": Step("step1_convert.py", step1_convert.main,
                  lambda run: [*map(str, run.inputs), "--out-dir", str(run.out), *run.extra],
                  # the events of nano_dy with only the branches the converter reads: fast to open
                  sources=lambda folder: [nano_layouts.reduced(folder / "nano_dy_reduced.root")], victim=NANO,
                  output=lambda src, out: out / f"{src.stem}.h5", same=same_h5, slow=("--step", "1"),
                  slow_source=PHYSLITE),
}


# ------------------------------------------------------------------------------------------------
# faults: (Run, tmp) -> Run
# ------------------------------------------------------------------------------------------------
def add_bad(run: Run, bad: Path) -> Run:
    return replace(run, inputs=[*run.inputs, bad], culprit=str(bad))


def bad_copy(name: str, write: Callable[[bytes], bytes], source: Path | None = None):
    """An input made from the bytes of a real file (default: the step's victim)."""
    def fault(run, tmp):
        src = source or STEPS[run.step].victim
        bad = tmp / f"{name}{src.suffix}"
        bad.write_bytes(write(src.read_bytes()))
        return add_bad(run, bad)
    fault.__name__ = name
    return fault


def truncated(fraction: float, source: Path | None = None):
    name = f"truncated_{fraction:g}" + (f"_{source.stem}" if source else "")
    return bad_copy(name, lambda b: b[: int(len(b) * fraction)], source)


def random_bytes(where: Callable[[bytes], tuple[int, int]], name: str, source: Path | None = None):
    """Random bytes over the range [start, stop) that where(file bytes) gives."""
    def write(b):
        start, stop = where(b)
        return b[:start] + np.random.default_rng(1).integers(0, 256, stop - start, dtype=np.uint8).tobytes() + b[stop:]
    return bad_copy(name, write, source)


def muon_pt_basket(_) -> tuple[int, int]:
    """The compressed bytes of nano_dy's first Muon_pt basket (the converter reads it), past its key."""
    branch = uproot.open(NANO)["Events"]["Muon_pt"]
    seek, size = int(branch.member("fBasketSeek")[0]), int(branch.member("fBasketBytes")[0])
    return seek + 100, seek + size


def missing_file(run, tmp):
    return add_bad(run, tmp / "not_there.root")


def text_file(run, tmp):
    bad = tmp / "notes.root"
    bad.write_text("this is not a ROOT file\n")
    return add_bad(run, bad)


def root_file(name: str, fill: Callable):
    """A ROOT file written with uproot: fill(open file)."""
    def fault(run, tmp):
        bad = tmp / f"{name}.root"
        with uproot.recreate(bad) as f:
            fill(f)
        return add_bad(run, bad)
    fault.__name__ = name
    return fault


HIST = np.histogram(np.arange(10.0), bins=5)


def events_dir(f):
    f.mkdir("Events")
    f["Events/h"] = HIST


def other_tree(f):
    f.mktree("Nominal", {"x": np.float32})
    f["Nominal"].extend({"x": np.zeros(3, np.float32)})


def real_file(path: Path):
    def fault(run, tmp):
        bad = tmp / path.name
        shutil.copy(path, bad)
        return add_bad(run, bad)
    fault.__name__ = path.stem
    return fault


def no_usable_collection(run, tmp):
    return add_bad(run, nano_layouts.reduced(tmp / "only_event_branches.root", drop=nano_layouts.STANDARD))


def read_only_out(run, tmp):
    out = tmp / "read_only"
    out.mkdir()
    out.chmod(0o555)
    run.cleanup.append(lambda: out.chmod(0o755))
    if os.access(out, os.W_OK):  # root ignores permissions: make the folder immutable instead
        if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
            pytest.skip("cannot make a folder read-only for this user")
        run.cleanup.insert(0, lambda: subprocess.run(["chattr", "-i", str(out)], capture_output=True))
    return replace(run, out=out, good={}, culprit=str(out))


def out_is_a_file(run, tmp):
    out = tmp / "out_file"
    out.write_text("")
    return replace(run, out=out, good={}, culprit=str(out))


def empty_folder(run, tmp):
    (tmp / "empty").mkdir()
    return replace(run, inputs=[tmp / "empty"], good={}, culprit="no input files")


def unmatched_pattern(run, tmp):
    return replace(run, inputs=[tmp / "nothing_*.root"], good={}, culprit="no input files")


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def stale_temp(folder: Path, final_name: str, content: bytes = b"partial") -> Path:
    """What a run killed while writing `final_name` leaves behind."""
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{final_name}.tmp{dead_pid()}"
    temp.write_bytes(content)
    return temp


def only_stale_temps(run, tmp):
    folder = tmp / "in"
    stale_temp(folder, "hzz4l.root", STEPS[run.step].victim.read_bytes())
    return replace(run, inputs=[folder], good={}, culprit="no input files")


def stale_temp_among_inputs(run, tmp):
    """A folder of inputs that also holds a killed run's temporary file: never an input."""
    folder = tmp / "in"
    folder.mkdir()
    for p in run.good:
        shutil.copy(p, folder / p.name)
    stale_temp(folder, "hzz4l.root", STEPS[run.step].victim.read_bytes()[:1000])
    return replace(run, inputs=[folder], good={folder / p.name: src for p, src in run.good.items()})


def stale_temp_in_out(run, tmp):
    """A killed earlier run left its temporary output: removed when the output is written."""
    stale_temp(run.out, STEPS[run.step].output(next(iter(run.good)), run.out).name)
    return run


def killed_mid_write(run, tmp):
    """kill -9 of a run while it writes (its temporary output exists), then the run under test is the
    rerun: it must write a good output and remove the killed run's temporary file."""
    s = STEPS[run.step]
    slow = tmp / "big" / s.slow_source.name  # a slow input: a wide window to kill in
    slow.parent.mkdir()
    shutil.copy(s.slow_source, slow)
    victim = replace(run, inputs=[slow], extra=[*run.extra, *s.slow])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / s.script), *s.argv(victim)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not temp_files(run.out) and proc.poll() is None:
        assert time.time() < deadline, "the run never started writing"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert temp_files(run.out)
    return replace(run, inputs=[*run.inputs, slow], good={**run.good, slow: s.slow_source})


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.glob(".*") if TEMP_OUTPUT.match(p.name)] if folder.is_dir() else []


def workers(n: int, inner):
    def fault(run, tmp):
        return replace(inner(run, tmp), extra=[*run.extra, "--workers", str(n)])
    fault.__name__ = f"{inner.__name__}_workers{n}"
    return fault


def same_stem(run, tmp):
    (tmp / "a").mkdir()
    first = next(iter(run.good))
    twin = tmp / "a" / first.name
    shutil.copy(first, twin)
    return replace(run, inputs=[*run.inputs, twin], good={}, culprit="would both write")


# ------------------------------------------------------------------------------------------------
# cases: (step, fault, exit code, words of the error line)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    step: str
    fault: Callable[[Run, Path], Run]
    code: int
    message: str = ""

    @property
    def id(self) -> str:
        return f"{self.step}-{self.fault.__name__}"


CASES = [
    Case("step1", missing_file, 1, "file not found"),
    Case("step1", truncated(0), 1, "not a ROOT file"),
    Case("step1", truncated(0.0005), 1, "truncated: 176 of the 352599 bytes"),
    Case("step1", truncated(0.1), 1, "truncated: 35259 of the 352599 bytes"),
    Case("step1", truncated(0.5), 1, "truncated: 176299 of the 352599 bytes"),
    Case("step1", truncated(0.999), 1, "truncated: 352246 of the 352599 bytes"),
    Case("step1", truncated(0.5, RNTUPLE), 1, "truncated: 1036325 of the 2072650 bytes"),
    Case("step1", truncated(0.05, RNTUPLE), 1, "truncated"),
    Case("step1", truncated(0.5, NANO), 1, "truncated"),
    Case("step1", random_bytes(lambda b: (0, 64), "random_bytes_at_start"), 1, "not a ROOT file"),
    Case("step1", random_bytes(muon_pt_basket, "random_bytes_mid_file"), 1, "unreadable data after entry 0"),
    Case("step1", text_file, 1, "not a ROOT file"),
    Case("step1", root_file("events_histogram", lambda f: f.__setitem__("Events", HIST)), 1,
         "Events is a TH1D, not a TTree or an RNTuple"),
    Case("step1", root_file("events_directory", events_dir), 1, "Events is a TDirectory, not a TTree or an RNTuple"),
    Case("step1", root_file("collectiontree_histogram", lambda f: f.__setitem__("CollectionTree", HIST)), 1,
         "CollectionTree is a TH1D"),
    Case("step1", root_file("other_tree", other_tree), 1, "no known tree (CollectionTree, EventData, Events)"),
    Case("step1", real_file(DATA / "nanoaod" / "nano_dy_empty.root"), 1, "no events (tree Events is empty)"),
    Case("step1", no_usable_collection, 1, "no usable collection"),
    Case("step1", workers(2, truncated(0.5)), 1, "truncated"),
    Case("step1", read_only_out, 2, "cannot write there"),
    Case("step1", out_is_a_file, 2, "cannot write there"),
    Case("step1", empty_folder, 2, "no input files"),
    Case("step1", unmatched_pattern, 2, "no input files"),
    Case("step1", only_stale_temps, 2, "no input files"),
    Case("step1", same_stem, 2, "would both write"),
    Case("step1", stale_temp_among_inputs, 0),
    Case("step1", stale_temp_in_out, 0),
    Case("step1", killed_mid_write, 0),
]


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The good inputs of each step, made once."""
    @functools.cache
    def make(step: str) -> list[Path]:
        return STEPS[step].sources(tmp_path_factory.mktemp(step))
    return make


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Outputs of clean runs, by (step, source file)."""
    folder = tmp_path_factory.mktemp("references")

    @functools.cache
    def reference(step: str, source: Path) -> Path:
        s = STEPS[step]
        out = folder / step / source.stem
        assert s.main(s.argv(Run(step, [source], out, {source: source}))) == 0
        return s.output(source, out)
    return reference


def run_step(step: Step, run: Run) -> int:
    try:
        return step.main(step.argv(run))
    except SystemExit as exc:  # die(): bad usage
        return exc.code


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fault(case, tmp_path, capfd, sources, references):
    step = STEPS[case.step]
    good_dir = tmp_path / "good"
    good_dir.mkdir()
    good = {Path(shutil.copy(src, good_dir / src.name)): src for src in sources(case.step)}
    run = case.fault(Run(case.step, list(good), tmp_path / "out", good), tmp_path)
    capfd.readouterr()
    try:
        code = run_step(step, run)
        err = capfd.readouterr().err
        assert code == case.code, err
        assert "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        if case.code == 0:
            assert not errors, err
        else:
            assert len(errors) == 1, err
            assert run.culprit in errors[0] and case.message in errors[0], errors[0]
        for path, source in run.good.items():
            step.same(step.output(path, run.out), references(case.step, source))
        assert not temp_files(run.out), "temporary files left"
    finally:
        for undo in run.cleanup:
            undo()


# ------------------------------------------------------------------------------------------------
# the runtime helpers every step shares
# ------------------------------------------------------------------------------------------------
def test_expand_inputs_leaves_out_hidden_and_temporary_files(tmp_path, capfd):
    for name in ("b.h5", "a.h5", ".DS_Store", f".c.h5.tmp{dead_pid()}"):
        (tmp_path / name).write_text("")
    (tmp_path / "sub").mkdir()
    assert expand_inputs([tmp_path]) == [str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]
    assert expand_inputs([str(tmp_path / "*.h5")]) == [str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]  # quoted glob
    temp = next(tmp_path.glob(".c.h5.tmp*"))
    assert expand_inputs([temp, tmp_path / "absent.h5"]) == [str(tmp_path / "absent.h5")]  # kept: 'file not found'
    assert f"warning: {temp}: skipped" in capfd.readouterr().err


def test_stale_temporary_files_go_and_a_running_writers_stays(tmp_path):
    final = tmp_path / "x.parquet"
    dead = stale_temp(tmp_path, final.name)
    alive = tmp_path / f".{final.name}.tmp{os.getppid()}"  # a process that exists: maybe still writing
    alive.write_text("")
    other = stale_temp(tmp_path, "y.parquet")
    with atomic_output(final) as tmp:
        Path(tmp).write_text("done")
    assert final.read_text() == "done"
    assert not dead.exists() and alive.exists() and other.exists()


def _exit_on_two(item):
    if item == 2:
        os._exit(9)  # a worker killed (out of memory, a signal)
    return item


def test_a_dead_worker_is_one_error_line(capfd):
    results, errors = process_inputs([1, 2, 3], _exit_on_two, workers=2)
    assert len(results) + len(errors) == 3
    assert any(line.startswith("error: 2: the worker process died") for line in errors), errors
    assert "Traceback" not in capfd.readouterr().err
