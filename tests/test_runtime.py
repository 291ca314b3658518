"""common.runtime: read_ahead, the background producer of apply's chunk pipeline, must hand over
every item in order, raise the producer's error in the consumer, and stop when the consumer stops;
made_from decides whether run_all reuses a backbone, converted_from whether it redoes a run."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.h5io import H5EventWriter
from common.runtime import made_from, provenance, read_ahead, write_json


def test_read_ahead_keeps_order_and_overlaps():
    produced = []

    def slow():
        for i in range(20):
            produced.append(i)
            yield i

    out = []
    for i in read_ahead(slow(), depth=2):
        time.sleep(0.002)
        assert len(produced) >= i + 1  # produced before it was consumed
        out.append(i)
    assert out == list(range(20))


def test_read_ahead_raises_the_producer_error():
    def failing():
        yield 1
        raise OSError("truncated chunk")

    it = read_ahead(failing())
    assert next(it) == 1
    with pytest.raises(OSError, match="truncated chunk"):
        next(it)


def test_read_ahead_stops_the_producer_when_the_consumer_stops():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    it = read_ahead(endless(), depth=1)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # a consumer leaving early (an error downstream): the thread must end
    assert threading.active_count() == before


def test_made_from_needs_every_input_recorded(tmp_path, monkeypatch):
    """run_all reuses a backbone only if its step3 read every token file of the run: one pretrained before
    PRETRAIN_PROCESSES or TASKS added a process is pretrained again."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "pretrain" / "metrics.json"
    out.parent.mkdir()
    write_json(out, {"provenance": provenance("step3_pretrain.py", None, ["tokens/a.parquet", "tokens/b.parquet"])})
    assert made_from(out, ["tokens/b.parquet", str(tmp_path / "tokens/a.parquet")]), "the same files, any spelling"
    assert not made_from(out, ["tokens/a.parquet", "tokens/b.parquet", "tokens/vbfh4l.parquet"])
    assert not made_from(tmp_path / "missing.json", ["tokens/a.parquet"])
    (tmp_path / "broken.json").write_text("{")
    assert not made_from(tmp_path / "broken.json", ["tokens/a.parquet"])


def test_run_all_pretrains_again_when_the_run_gains_processes(tmp_path):
    """run_all's own check (its functions, run by bash): a backbone without the new processes is forgotten
    with the classifiers trained on it; one with all of them is kept."""
    root = Path(__file__).resolve().parent.parent
    script = (root / "run_all.sh").read_text()
    functions = script[script.index("pretrained_on() {"):script.index('[ -e "$RUN/pretrain/metrics.json" ]')]
    run = tmp_path / "run"
    for d in ("pretrain", "finetune", "finetune_multiclass"):
        (run / d).mkdir(parents=True)
        (run / d / "metrics.json").write_text("{}")
    write_json(run / "pretrain" / "metrics.json",
               {"provenance": provenance("step3_pretrain.py", None, [run / "tokens/hzz4l.parquet"])})
    (run / "pretrain" / "backbone.pt").write_text("")
    check = functions + ('[ -e "$1/pretrain/metrics.json" ] && ! pretrained_on "$1/pretrain" "${@:2}" && '
                         'redo_pretraining "$1/pretrain" "$1/finetune" "$1/finetune_multiclass"; true')
    env = {**os.environ, "PYTHONPATH": str(root)}
    kept = subprocess.run(["bash", "-c", check, "-", run, run / "tokens/hzz4l.parquet"], capture_output=True, text=True,
                          env=env, cwd=root)
    assert kept.returncode == 0 and kept.stdout == "" and (run / "pretrain/backbone.pt").exists()
    redo = subprocess.run(["bash", "-c", check, "-", run, run / "tokens/hzz4l.parquet", run / "tokens/vbfh4l.parquet"],
                          capture_output=True, text=True, env=env, cwd=root)
    assert redo.returncode == 0 and "pretraining again" in redo.stdout
    assert not any((run / d / f).exists() for d, f in (("pretrain", "backbone.pt"), ("pretrain", "metrics.json"),
                                                       ("finetune", "metrics.json"), ("finetune_multiclass", "metrics.json")))


def test_run_all_redoes_a_run_whose_files_came_from_other_root_files(tmp_path):
    """A process moved from the corpus (PRETRAIN_EVENTS) into the task (EVENTS) by TASKS=multiclass has a converted
    file made from its corpus ROOT file: run_all's check (run by bash) must name it and redo every later step."""
    root = Path(__file__).resolve().parent.parent
    script = (root / "run_all.sh").read_text()
    check = script[script.index('stale="$('):script.index("run_step step1_convert")]
    run = tmp_path / "run"
    (run / "h5").mkdir(parents=True)
    for p, source in (("hzz4l", "task/hzz4l.root"), ("vbfh4l", "corpus/vbfh4l.root")):
        writer = H5EventWriter(run / "h5" / f"{p}.h5")
        writer.close({"input_file": str(tmp_path / source)})
    prelude = ('RUN="$1" OVERWRITE=0 overwrite=(); h5=("$RUN/h5/hzz4l.h5" "$RUN/h5/vbfh4l.h5" "$RUN/h5/new.h5"); '
               'raw=("$2/task/hzz4l.root" "$2/$3/vbfh4l.root" "$2/task/new.root")\n')
    report = '\necho "overwrite=$OVERWRITE ${overwrite[*]}"'
    env = {**os.environ, "PYTHONPATH": str(root)}

    def run_check(vbf_dir):
        return subprocess.run(["bash", "-c", prelude + check + report, "-", run, tmp_path, vbf_dir],
                              capture_output=True, text=True, env=env, cwd=root, check=True).stdout
    assert run_check("corpus").strip() == "overwrite=0", "the same ROOT files (a new process is only missing)"
    moved = run_check("task")
    assert "vbfh4l: converted" in moved and "hzz4l" not in moved.split(":")[0], moved
    assert moved.strip().endswith("overwrite=1 --overwrite")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="mimalloc is preloaded on Linux only")
def test_env_sh_finds_the_mimalloc_that_run_all_preloads():
    """env.sh's own lines find the environment's mimalloc (MIMALLOC, which run_all and the tests preload; an
    empty MIMALLOC keeps glibc's malloc); a process started with it runs on mimalloc, and provenance says so."""
    root = Path(__file__).resolve().parent.parent
    script = (root / "env.sh").read_text()
    find = script[script.index("_lib="):script.index("unset _here")] + 'echo "$MIMALLOC"'
    env = {k: v for k, v in os.environ.items() if k != "MIMALLOC"}
    lib = subprocess.run(["bash", "-c", find], env={**env, "VENV": sys.prefix}, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert lib.endswith("libmimalloc.so") and Path(lib).is_file(), lib
    kept = subprocess.run(["bash", "-c", find], env={**env, "VENV": sys.prefix, "MIMALLOC": ""}, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert kept == ""
    # an environment without it (not Linux, or a site's own interpreter) under run_all's `set -euo pipefail`: no
    # mimalloc, and no silent exit (the failed `ls` of the pipeline once ended run_all with status 2 and no message)
    strict = subprocess.run(["bash", "-c", "set -euo pipefail; " + find], env={**env, "VENV": str(root / "nowhere")},
                            capture_output=True, text=True)
    assert (strict.returncode, strict.stdout.strip()) == (0, ""), strict.stderr
    code = ("import torch; from common.runtime import provenance; torch.randn(512, 512).matmul(torch.randn(512, 512)); "
            "print(provenance('x', None)['allocator'])")
    for preload, want in ((lib, "mimalloc"), ("", "system")):
        child = subprocess.run([sys.executable, "-c", code], env={**env, "LD_PRELOAD": preload, "PYTHONPATH": str(root)},
                               capture_output=True, text=True)
        assert (child.returncode, child.stdout.strip(), child.stderr) == (0, want, ""), (preload, child.stderr)
