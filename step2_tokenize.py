"""Step 2: object tokenizers (fit) and event token sequences (apply).

  python step2_tokenize.py fit   --h5 data/h5/*.h5 --out-dir runs/tok                              # step2_fit.py
  python step2_tokenize.py apply --h5 data/h5/*.h5 --tokenizers runs/tok --out-dir data/tokens   # step2_apply.py

Hands the rest of the command line to the chosen script; `fit --help`, `apply --help` list the flags.
"""
from __future__ import annotations

import sys

from common import runtime  # first: sets the OpenMP wait policy before torch and numba load

import step2_apply  # noqa: E402
import step2_fit  # noqa: E402

COMMANDS = {"fit": step2_fit.main, "apply": step2_apply.main}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return runtime.EXIT_OK
    if not argv or argv[0] not in COMMANDS:
        runtime.die(f"expected fit or apply, got {argv[0] if argv else 'nothing'} (see --help)")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    runtime.bound_heap_growth()  # memory flat over many chunks
    sys.exit(main())
