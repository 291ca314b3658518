"""A step script run in-process, as a test sees a subprocess: `run_script("step2_tokenize.py", "fit", ...)`
returns its exit code, stdout and stderr (die() and argparse exits included). A subprocess would spend
~5 s importing torch; the suite runs a few hundred steps."""
from __future__ import annotations

import contextlib
import importlib
import io
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the step scripts, imported to call their main(argv)


def run_script(script: str, *args) -> subprocess.CompletedProcess:
    main = importlib.import_module(Path(script).stem).main
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())
