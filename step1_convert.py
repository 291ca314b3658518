"""Step 1: ATLAS DAOD_PHYSLITE (TTree CollectionTree or RNTuple EventData) and CMS NanoAOD (TTree or RNTuple
Events, standard or scouting) -> one HDF5 file per input with /common, /atlas or /cms, and /metadata (layout:
common/schema.py).

    python step1_convert.py data/raw/*.root --out-dir data/h5
    python step1_convert.py /eos/.../DAOD_PHYSLITE/ --out-dir h5 --workers 4 --shard 3/10

Objects pass a pT cut, are sorted by pT and padded to max_objects per type (mask, n); chunks of
--step events are read with uproot and appended to the HDF5 file, so memory stays flat (the
conversion itself: common/root_to_h5.py).
"""
from __future__ import annotations

import argparse
import functools
import random
import sys
from pathlib import Path

import numpy as np

from common.jet_constituents import MODES as CONSTITUENT_MODES
from common.root_to_h5 import convert_file
from common.runtime import (die, exit_code, input_files, output_dir, parse_shard, per_object, process_inputs,
                            provenance, select_shard)

# ----------------------------------------------------------------------------------------------
PT_CUTS = {"electrons": 7.0, "muons": 5.0, "taus": 20.0, "photons": 10.0, "jets": 20.0, "tracks": 0.5}  # GeV
MAX_OBJECTS = {"electrons": 6, "muons": 6, "taus": 4, "photons": 6, "jets": 15, "tracks": 30}
OUT_DIR = "data/h5"
EXPERIMENT = "auto"
CONSTITUENTS = "auto"  # links (PHYSLITE GhostTrack), else pfnano (PFNano JetPFCands), else delta_r
STEP = 20000  # events per chunk
WORKERS = 1
SEED = 0
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="ROOT files or directories of them")
    p.add_argument("--out-dir", default=OUT_DIR, help="one <input stem>.h5 per input goes here")
    p.add_argument("--experiment", choices=("auto", "atlas", "cms"), default=EXPERIMENT,
                   help="auto: CollectionTree/EventData -> ATLAS PHYSLITE, Events -> CMS NanoAOD")
    p.add_argument("--pt-cuts", default="", help=f"per-object pT cuts in GeV, e.g. jets=25,tracks=1 (defaults {PT_CUTS})")
    p.add_argument("--max-objects", default="", help=f"per-object maximum stored, e.g. jets=10 (defaults {MAX_OBJECTS})")
    p.add_argument("--constituents", choices=CONSTITUENT_MODES, default=CONSTITUENTS,
                   help="jet constituents (common/jet_constituents/*): auto = links, else pfnano, else delta_r; "
                        "a named source the file lacks fails that file")
    p.add_argument("--step", type=int, default=STEP, help="events per chunk (memory ~ step)")
    p.add_argument("--workers", type=int, default=WORKERS, help="files converted in parallel")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    p.add_argument("--seed", type=int, default=SEED, help="recorded; the conversion itself is deterministic")
    p.add_argument("--shard", default=None, help="K/N: convert only batch job K's share of the sorted inputs")
    p.add_argument("--process", default=None, help="process name for /metadata (else from the file, else 'unknown')")
    p.add_argument("--dsid", type=int, default=None, help="dataset id (else mcChannelNumber)")
    p.add_argument("--cross-section", type=float, default=None, help="cross-section in pb (else from the file, else NaN)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        parse_shard(args.shard)
    except ValueError as exc:
        die(str(exc))
    if args.step < 1 or args.workers < 1:
        die("--step and --workers must be >= 1")
    random.seed(args.seed)  # nothing here is random; seeded anyway (torch not imported: it costs seconds)
    np.random.seed(args.seed % 2**32)
    pt_cuts = per_object(args.pt_cuts, PT_CUTS, "--pt-cuts", float)
    max_objects = per_object(args.max_objects, MAX_OBJECTS, "--max-objects", int)
    inputs = select_shard(input_files(args.inputs), args.shard)
    stems = {}
    for p in inputs:
        if Path(p).stem in stems:
            die(f"inputs {stems[Path(p).stem]} and {p} would both write {Path(p).stem}.h5")
        stems[Path(p).stem] = p
    output_dir(args.out_dir)
    settings = dict(out_dir=args.out_dir, experiment=args.experiment, pt_cuts=pt_cuts, max_objects=max_objects,
                    step=args.step, overwrite=args.overwrite, seed=args.seed, process=args.process, dsid=args.dsid,
                    cross_section=args.cross_section, constituents=args.constituents,
                    provenance=provenance("step1_convert.py", args, inputs))
    _, errors = process_inputs(inputs, functools.partial(convert_file, settings=settings), workers=args.workers)
    return exit_code(errors)


if __name__ == "__main__":
    sys.exit(main())
