"""Code shared by the step scripts (see README.md).

Importing the package sets OMP_WAIT_POLICY=PASSIVE unless the user chose a policy. OpenMP (torch's
and numba's thread pools, LightGBM) reads it once, when its runtime loads, so a step script must
import `common` before torch, numba or lightgbm. Idle OpenMP threads then sleep instead of spinning:
on a machine shared with other jobs, spinning threads wait for cores that others hold and a run
with all cores becomes several times slower than one with a single thread.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
