"""--threads of every step: common.runtime.usable_cpus (affinity, cgroup CPU quota, OMP_NUM_THREADS,
SLURM_CPUS_PER_TASK) and set_threads, with the cgroup files and the batch systems' variables mocked;
and the passive OpenMP wait policy that importing `common` sets."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import runtime
from common.runtime import cgroup_cpu_limit, set_threads, usable_cpus

ROOT = Path(__file__).resolve().parent.parent


def cgroup(tmp_path, proc_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake cgroup mount and /proc/self/cgroup."""
    root = tmp_path / "sys_fs_cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_line)
    return root, proc


def test_cgroup_v2_smallest_quota_of_the_job_and_its_parents(tmp_path):
    """A Slurm or HTCondor job on a cgroup v2 host: the limit sits on the job's cgroup, not the step's."""
    root, proc = cgroup(tmp_path, "0::/system.slice/job_42/step_0\n", {
        "system.slice/job_42/step_0/cpu.max": "max 100000\n",
        "system.slice/job_42/cpu.max": "250000 100000\n",
        "system.slice/cpu.max": "800000 100000\n",
        "cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root, proc) == 2.5


def test_cgroup_v2_inside_a_container(tmp_path):
    root, proc = cgroup(tmp_path, "0::/\n", {"cpu.max": "150000 100000\n"})
    assert cgroup_cpu_limit(root, proc) == 1.5


def test_cgroup_v1_cpu_controller(tmp_path):
    files = {"cpu,cpuacct/htcondor/slot1_1/cpu.cfs_quota_us": "400000\n",
             "cpu,cpuacct/htcondor/slot1_1/cpu.cfs_period_us": "100000\n"}
    root, proc = cgroup(tmp_path, "4:cpu,cpuacct:/htcondor/slot1_1\n2:memory:/htcondor/slot1_1\n", files)
    assert cgroup_cpu_limit(root, proc) == 4.0
    (root / "cpu,cpuacct/htcondor/slot1_1/cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert cgroup_cpu_limit(root, proc) is None


def test_no_cgroup_limit(tmp_path):
    root, proc = cgroup(tmp_path, "0::/user.slice\n", {"user.slice/cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root, proc) is None
    assert cgroup_cpu_limit(tmp_path / "none", tmp_path / "none") is None


@pytest.mark.parametrize("affinity,quota,env,expected", [
    (16, None, {}, 16),  # a whole node
    (16, 3.6, {}, 4),  # a container with 3.6 CPUs
    (16, 0.3, {}, 1),
    (16, None, {"SLURM_CPUS_PER_TASK": "2"}, 2),
    (16, None, {"OMP_NUM_THREADS": "3"}, 3),  # HTCondor sets it to request_cpus
    (16, None, {"OMP_NUM_THREADS": "4,2", "SLURM_CPUS_PER_TASK": "6"}, 6),  # a nested OpenMP list: not a count
    (2, None, {"OMP_NUM_THREADS": "8"}, 2),  # bound to 2 cores (Slurm task/cgroup): more threads do not help
])
def test_usable_cpus_is_the_smallest_limit(monkeypatch, affinity, quota, env, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: quota)
    for var in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert usable_cpus() == expected


def test_set_threads_sets_torch_and_numba(monkeypatch):
    torch = pytest.importorskip("torch")
    numba = pytest.importorskip("numba")
    before = torch.get_num_threads(), numba.get_num_threads()
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 1)
    try:
        assert set_threads(0) == 1 and torch.get_num_threads() == 1 and numba.get_num_threads() == 1
        assert set_threads(2) == 2 and torch.get_num_threads() == 2
        assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])


@pytest.mark.parametrize("chosen,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_common_sets_a_passive_openmp_wait_policy(chosen, expected):
    """Before torch loads OpenMP, unless the user chose a policy."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if chosen:
        env["OMP_WAIT_POLICY"] = chosen
    code = "import common, os; print(os.environ['OMP_WAIT_POLICY'])"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected
