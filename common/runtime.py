"""What every step script shares at run time: exit codes, one-line errors, atomic outputs,
batch sharding, seeds, provenance (code version, settings) and read-ahead of chunk streams."""
from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import queue
import random
import re
import subprocess
import sys
import tempfile
import threading
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class InputError(Exception):
    """A bad input: the message is one line naming the cause (the file is added by the caller)."""


def first_line(cause: object) -> str:
    """An exception (or any cause) as one line: its message's first line, else its type's name."""
    return str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__


def error_line(path: str | os.PathLike, cause: object) -> str:
    return f"error: {path}: {first_line(cause)}"


def die(message: str, code: int = EXIT_USAGE) -> None:
    """Print one line to stderr and exit (2 = bad usage by default)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _call(fn: Callable, item) -> tuple[object, str | None]:
    try:
        return fn(item), None
    except InputError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001
        # Real readers (uproot, h5py) raise many types for corrupt input, and one input must never
        # stop the others: keep one line, and let a developer see the trace when they ask for it.
        if os.environ.get("TOKEVENT_DEBUG"):
            traceback.print_exc()
        return None, f"{type(exc).__name__}: {exc}"


def _outcome(future) -> tuple[object, str | None]:
    try:
        return future.result()
    except BrokenProcessPool:  # the worker was killed (out of memory, a signal): this item and the pending ones
        return None, "the worker process died (killed, or out of memory)"


def process_inputs(items: Sequence, fn: Callable, workers: int = 1, label: Callable = str) -> tuple[list, list[str]]:
    """Run fn on every item (in `workers` processes); a failure is reported and does not stop the others.

    Returns (results of the successful items, error lines of the failed ones)."""
    results, errors = [], []
    if workers > 1 and len(items) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(items))) as pool:
            outcomes = [_outcome(f) for f in [pool.submit(_call, fn, item) for item in items]]
    else:
        outcomes = [_call(fn, item) for item in items]
    for item, (result, err) in zip(items, outcomes):
        if err is None:
            results.append(result)
        else:
            line = error_line(label(item), err)
            print(line, file=sys.stderr)
            errors.append(line)
    return results, errors


def per_object(text: str | Sequence[str], defaults: dict, flag: str, cast) -> dict:
    """Per-object settings in the one syntax of every step, 'jets=25,tracks=1', on top of the
    defaults. A list (a flag given several times) is read as its items joined by commas."""
    out = dict(defaults)
    items = text.split(",") if isinstance(text, str) else [t for part in text for t in part.split(",")]
    for item in filter(None, (t.strip() for t in items)):
        name, _, value = item.partition("=")
        if name not in defaults or not value:
            die(f"{flag}: expected OBJECT=VALUE with OBJECT in {', '.join(defaults)}, got {item!r}")
        try:
            out[name] = cast(value)
        except ValueError:
            die(f"{flag}: {item!r} is not a number")
    return out


def exit_code(errors: Iterable) -> int:
    errors = list(errors)
    if errors:
        print(f"{len(errors)} input(s) failed:", file=sys.stderr)
        for line in errors:
            print(f"  {line}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


# Outputs are written as ".<name>.tmp<pid>" next to the final file and renamed when complete.
TEMP_OUTPUT = re.compile(r"^\..+\.tmp(\d+)$")


def temp_output(final: str | os.PathLike) -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.tmp{os.getpid()}")


def remove_stale_temps(final: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of `final` that runs killed while writing left behind (their
    process is gone); a run still writing on this machine keeps its own. Returns what was deleted."""
    final = Path(final)
    removed = []
    for p in final.parent.glob(glob.escape(f".{final.name}.tmp") + "*"):
        m = TEMP_OUTPUT.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _process_alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_output(final: str | os.PathLike):
    """Yield a temporary path next to `final`; rename it to `final` only if the block succeeds.
    Temporary files of killed earlier runs for the same output are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = temp_output(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def parse_shard(text: str | None) -> tuple[int, int]:
    """'K/N' (1-based K) -> (K, N). None -> (1, 1)."""
    if not text:
        return 1, 1
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be K/N with integers, got {text!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def select_shard(items: Sequence, shard: str | None) -> list:
    """The items of batch job K of N: every N-th item of the sorted list, starting at K-1.
    Deterministic, so N jobs together cover every item exactly once."""
    k, n = parse_shard(shard)
    return sorted(items, key=str)[k - 1 :: n]


def usable_cpus() -> int:
    """The CPUs this process may really use: its affinity (how Slurm's task/cgroup binds a job),
    capped by a cgroup CPU quota (how container runtimes and HTCondor with a hard CPU limit
    restrict it) and by OMP_NUM_THREADS (HTCondor sets it to request_cpus) or SLURM_CPUS_PER_TASK."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit()
    if quota:
        n = min(n, max(1, int(quota + 0.5)))
    for var in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        try:
            n = min(n, max(1, int(os.environ[var])))
        except (KeyError, ValueError):
            pass
    return max(1, n)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs allowed by the cgroup quota of this process, None when unlimited: the smallest quota
    of its own cgroup and every cgroup above it (cgroup v2 cpu.max; v1 cpu.cfs_quota_us over
    cpu.cfs_period_us), found from /proc/self/cgroup under the mount `root`."""
    limits = []
    for folder in _cgroup_folders(root, proc):
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max":
                limits.append(int(quota) / int(period))
            continue
        except (OSError, ValueError):
            pass
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
            if quota > 0 and period > 0:
                limits.append(quota / period)
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def _cgroup_folders(root: Path, proc: Path) -> list[Path]:
    """The process's cgroup folders, its own first, then each parent up to the mount root: the v2
    unified tree ('0::/path') and the v1 cpu controller ('N:cpu,cpuacct:/path'), wherever mounted."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        lines = []
    folders = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            bases = [root]
        elif "cpu" in controllers.split(","):
            bases = [root / controllers, root / "cpu"]
        else:
            continue
        for base in bases:
            here = base / path.lstrip("/")
            while True:
                folders.append(here)
                if here == base:
                    break
                here = here.parent
    return list(dict.fromkeys(folders + [root, root / "cpu"]))


def set_threads(threads: int) -> int:
    """--threads of every step: N > 0 threads, 0 the usable CPUs (usable_cpus). Sets torch's and
    numba's pools; returns the number set. Idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE, set
    by importing `common`), so on a machine shared with other jobs all usable CPUs are not slower
    than one thread (bench/README.md)."""
    import torch

    n = threads if threads > 0 else usable_cpus()
    torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


def git_hash() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=PROJECT_ROOT,
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def allocator() -> str:
    """The malloc this process runs on: 'mimalloc' where it is preloaded (run_all and the tests: env.sh), else
    'system'. It changes no number, only the speed and the memory of the training loops."""
    try:
        return "mimalloc" if "libmimalloc" in Path("/proc/self/maps").read_text() else "system"
    except OSError:  # no /proc (macOS)
        return "system"


def provenance(script: str, args, inputs: Iterable = ()) -> dict:
    """What an output records about how it was made: script, settings, inputs, code version."""
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} if args is not None else {}
    return {"script": script, "settings": settings, "inputs": [str(p) for p in inputs],
            "git_hash": git_hash(), "python": sys.version.split()[0], "allocator": allocator()}


def made_from(output_json: str | os.PathLike, inputs: Iterable) -> bool:
    """Whether a finished output (a JSON with a provenance block) was made from every one of these
    inputs: run_all reuses a backbone only then."""
    try:
        recorded = json.loads(Path(output_json).read_text())["provenance"]["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    seen = {Path(p).resolve() for p in recorded}
    return all(Path(p).resolve() in seen for p in inputs)


def expand_inputs(paths: Iterable[str]) -> list[str]:
    """Keep the user's order; a directory stands for the files inside it (sorted), a pattern the
    shell did not expand ('data/*.h5' quoted, or matching nothing) for its matches. Hidden files and
    the temporary outputs of other runs ('.<name>.tmp<pid>', written or left by a killed run) are
    never inputs. A path that does not exist is kept: the step reports it as 'file not found'."""
    out = []
    for p in map(str, paths):
        pp = Path(p)
        if pp.is_dir():
            out.extend(sorted(str(x) for x in pp.iterdir() if x.is_file() and not x.name.startswith(".")))
        elif not pp.exists() and glob.has_magic(p):
            out.extend(x for x in sorted(glob.glob(p)) if Path(x).is_file())
        elif TEMP_OUTPUT.match(pp.name):
            print(f"warning: {p}: skipped (the temporary output of another run)", file=sys.stderr)
        else:
            out.append(p)
    return out


def input_files(paths: Sequence[str]) -> list[str]:
    """expand_inputs, and exit 2 with 'no input files' when that leaves nothing (an empty folder, a
    pattern that matches nothing): every step that takes input lists starts with this."""
    files = expand_inputs(paths)
    if not files:
        die(f"no input files in {' '.join(map(str, paths))}")
    return files


def output_dir(path: str | os.PathLike, flag: str = "--out-dir") -> Path:
    """Create the output folder if needed and check that a file can be written there; exit 2 naming
    it when not (read-only, no permission, a file in the way): no input could be converted."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test"):
            pass
    except OSError as exc:
        die(f"{flag} {path}: cannot write there ({exc.strerror or type(exc).__name__})")
    return path


def bound_heap_growth(threshold: int = 1 << 20) -> None:
    """Serve allocations of `threshold` bytes and more by mmap, so that freeing them returns the
    memory to the system. glibc's default threshold rises with use and every thread (torch's,
    numba's, read_ahead's) has its own heap: in a long streaming run the freed chunk-sized arrays
    fragment those heaps and the resident memory grows with the number of chunks. Linux only."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD


def read_ahead(items: Iterable, depth: int = 1) -> Iterator:
    """Iterate `items` in a background thread, up to `depth` items ahead of the consumer, so that
    producing the next chunk (reading, or computing) overlaps with using this one. Numpy, h5py,
    pyarrow, torch and the numba kernels release the GIL in their heavy parts. An exception in
    the producer is raised in the consumer; a consumer that stops early stops the producer."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            ready.put((end, None))
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put((end, exc))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, exc = ready.get()
            if exc is not None:
                raise exc
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()

