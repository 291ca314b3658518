"""Step 0: the built-in sample. Pythia8 events through a parametric ATLAS-like detector,
written as a PHYSLITE-like ROOT file (TTree CollectionTree, real branch names, MeV).

    python step0_generate.py --process hzz4l --events 2000 --seed 1 --out data/raw/hzz4l.root

Events come in blocks of --block events, each seeded from (--seed, dataset id, block), so the file
depends on --seed and --block only: not on --workers or --chunk. The processes and the generation
are in common/generation.py, the detector in common/detector.py, the file layout in
common/physlite_writer.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.generation import BLOCK, CHUNK, PROCESSES, generate  # BLOCK: events per seed block, CHUNK: per write
from common.runtime import EXIT_OK, die, provenance

PROCESS = "hzz4l"
EVENTS = 2000
SEED = 1
WORKERS = 1


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--process", choices=sorted(PROCESSES), default=PROCESS)
    ap.add_argument("--events", type=int, default=EVENTS)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--workers", type=int, default=WORKERS, help="worker processes (the file does not depend on it)")
    ap.add_argument("--block", type=int, default=BLOCK, help="events per seed block (the file depends on it)")
    ap.add_argument("--chunk", type=int, default=CHUNK, help="events per write to the file")
    ap.add_argument("--out", type=Path, default=None, help="default data/raw/<process>.root")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--list-processes", action="store_true", help="print every process (name, dataset id, what) and exit")
    args = ap.parse_args(argv)
    for name in ("events", "workers", "block", "chunk"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")  # exits 2
    if not 0 <= args.seed < 2**31:
        ap.error("--seed must be in [0, 2**31)")
    args.out = args.out or Path("data/raw") / f"{args.process}.root"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_processes:
        for name, proc in PROCESSES.items():
            print(f"{name} {proc['dsid']} {proc['description']}")
        return EXIT_OK
    if args.out.exists() and not args.overwrite:
        print(f"step0: {args.out} exists, skipped (use --overwrite to regenerate)", file=sys.stderr)
        return EXIT_OK
    try:
        totals = generate(args.process, args.events, args.seed, args.out, block=args.block, chunk=args.chunk,
                          workers=args.workers, provenance=provenance("step0_generate.py", args), desc="step0")
    except (OSError, RuntimeError) as exc:
        die(f"{args.out}: {exc}", code=1)
    per_event = (totals["t_init"] + totals["t_pythia"] + totals["t_detector"] + totals["t_write"]) / totals["n_events"]
    print(f"step0: wrote {args.out}: {totals['n_events']} {args.process} events, "
          f"sigma = {totals['cross_section_pb']:.4g} pb, {1 / per_event:.0f} events/s per worker "
          f"(Pythia {totals['t_pythia'] / totals['n_events'] * 1e3:.1f} ms/event, "
          f"detector+branches {totals['t_detector'] / totals['n_events'] * 1e3:.1f} ms/event)", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
