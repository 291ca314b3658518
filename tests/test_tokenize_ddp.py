"""step2_tokenize fit under torchrun: 2 CPU processes on the gloo backend must end with
identical codebooks (EMA statistics all-reduced, k-means init and dead-code resets broadcast)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import torch

from test_tokenize import ROOT, write_synthetic_h5


def test_two_gloo_ranks_hold_identical_codebooks(tmp_path):
    h5 = write_synthetic_h5(tmp_path / "ttbar.h5", 2000, seed=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "step2_tokenize.py"), "fit", "--h5", str(h5), "--out-dir", str(tmp_path / "tok"),
           "--objects", "electrons", "--steps", "80", "--warmup-steps", "20", "--batch-size", "128",
           "--levels", "3", "--no-plots", "--preprocess-events", "1500", "--dead-fraction", "0.5"]
    # own session: on a timeout the launcher and both ranks are stopped together, none is left behind
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    side = json.loads((tmp_path / "tok" / "electrons.json").read_text())
    ddp = side["ddp"]
    assert ddp["world_size"] == 2 and len(ddp["codebook_sha256_per_rank"]) == 2
    assert ddp["identical"] and len(set(ddp["codebook_sha256_per_rank"])) == 1
    # the synchronised codebooks were really trained: EMA moved them and resets happened
    state = torch.load(tmp_path / "tok" / "electrons.pt", weights_only=True)
    assert int(state["model.quantizer.resets"].sum()) > 0
    assert side["quality"]["codes"][0]["used"] > 1
