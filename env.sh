#!/usr/bin/env bash
# Source this file: it creates the project's virtual environment (.venv) when it is missing
# or when requirements.txt changed since it was made, then activates it.
#   VENV=/path/to/venv  use another location;  PYTHON=python3.11  use another interpreter.
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$_here/.venv}"
PYTHON="${PYTHON:-python3}"
_stamp="$VENV/.requirements.sha256"
_recipe=2  # how the environment is built: a change here rebuilds environments made the old way
_want="$( (cat "$_here/requirements.txt"; echo "recipe $_recipe") | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
    echo "[env] creating $VENV from requirements.txt (first run only)" >&2
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
        || echo "[env] warning: the project is tested with Python 3.11, this is $("$PYTHON" --version)" >&2
    "$PYTHON" -m venv "$VENV" || return 1 2>/dev/null || exit 1
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2 || true
    # --no-compile, then byte-compile every package in parallel (17 s on 2 cores; pip's own serial
    # compile took 105 s). Compile them all, not only what the steps import at start: with
    # PYTHONDONTWRITEBYTECODE set (as on many batch and CI machines), a module imported later without a
    # .pyc is compiled again in every process (torch._dynamo, which torch's optimisers load: 1.4 s each)
    "$VENV/bin/python" -m pip install --quiet --no-compile -r "$_here/requirements.txt" >&2 || {
        echo "[env] error: pip install -r requirements.txt failed" >&2; return 1 2>/dev/null || exit 1; }
    "$VENV/bin/python" -m compileall -qq -j 0 "$VENV/lib" >&2 || true  # a few packages ship test files of Python 2
    echo "$_want" > "$_stamp"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PYTHONPATH="$_here${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg
# Idle OpenMP threads (torch, numba, LightGBM) sleep instead of spinning: on a shared node spinning
# threads wait for cores other jobs hold. Set OMP_WAIT_POLICY=ACTIVE yourself on a dedicated node.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# mimalloc, a drop-in malloc (requirements.txt, Linux). run_all (steps 2-4) and the tests preload it
# (LD_PRELOAD=$MIMALLOC): under glibc's malloc step3's heap grows by some 50 MB a pass and its passes slow by
# 12-16% over six (bench/README.md, "mimalloc"). Not preloaded here, so it touches no other program of your
# shell; for a step run alone: LD_PRELOAD=$MIMALLOC python step3_pretrain.py ...  MIMALLOC= keeps glibc's.
_lib="$(ls "$VENV"/lib/python3*/site-packages/cmeel.prefix/lib/libmimalloc.so 2>/dev/null | head -n 1 || true)"  # none: glibc's malloc (run_all sets pipefail)
[[ "$_lib" == *[[:space:]:]* ]] && _lib=""  # LD_PRELOAD splits at blanks and colons
# an empty MIMALLOC is kept (glibc's malloc), as is a library of your own; a stale path is replaced
if [ -z "${MIMALLOC+set}" ] || { [ -n "$MIMALLOC" ] && [ ! -f "$MIMALLOC" ]; }; then MIMALLOC="$_lib"; fi
export MIMALLOC
unset _here _stamp _want _recipe _lib
preload_mimalloc() {  # run_all (from step2 on) and tests/run.sh: this shell's later programs run on mimalloc
    if [ -n "$MIMALLOC" ]; then export LD_PRELOAD="$MIMALLOC${LD_PRELOAD:+ $LD_PRELOAD}"; fi
}
