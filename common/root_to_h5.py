"""ROOT to HDF5: one ATLAS PHYSLITE or CMS NanoAOD file into one HDF5 file of the schema
(docs/DESIGN.md section 2), read and written in chunks so memory stays flat. step1_convert.py is its
command line.

List objects pass a pT cut, are sorted by pT and padded to max_objects per type (mask, n). Jet
constituents (common/jet_constituents.py) follow the stored jets and are appended block by block of
HDF5 chunk length: their (events, jets, constituents) arrays are the largest of a chunk.
"""
from __future__ import annotations

import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import jet_constituents, nanoaod, physics, physlite
from common.h5io import H5EventWriter
from common.runtime import InputError, remove_stale_temps
from common.schema import (CONSTITUENT_DELTA_R, ISO_CONE, ISO_PT_FLOOR_GEV, ISO_Z0SINTHETA_CUT_MM, LIST_OBJECTS,
                           MISSING_INT, features_for)

READERS = {"atlas": (physlite.TREES, physlite.PhysliteReader), "cms": (nanoaod.TREES, nanoaod.NanoAODReader)}


def open_reader(path: str, experiment: str, pt_cuts: dict, constituents: str = "auto"):
    """(reader, experiment, uproot file, what was read): the format is found from the tree the file holds;
    `constituents` is the requested source of jet constituents (jet_constituents.MODES)."""
    if not os.path.exists(path):
        raise InputError("file not found")
    trees = {name: exp for exp, (names, _) in READERS.items() if experiment in ("auto", exp) for name in names}
    tree, name, f = physlite.open_tree(path, trees)
    kind = physlite.tree_kind(tree)
    if tree.num_entries == 0:
        raise InputError(f"no events (tree {name} is empty)")
    exp = trees[name]
    return READERS[exp][1](tree, kind, pt_cuts, constituents), exp, f, f"{'TTree' if kind == 'ttree' else 'RNTuple'} {name}"


def finish_chunk(out: dict, experiment: str, pt_cuts: dict, max_objects: dict, truncated: dict) -> dict:
    """Cut, sort by pT, pad: jagged reader output -> fixed-shape numpy arrays of the schema's dtypes."""
    arrays = {}
    for obj in LIST_OBJECTS:
        m = max_objects[obj]
        offsets, pt = physics.flat(out[f"common/{obj}/pt"])
        index, mask, n_kept = physics.padded_index(offsets, pt, pt > pt_cuts[obj], m)
        for f in features_for(obj, experiment):
            key = f"{f.group}/{obj}/{f.name}"
            arrays[key] = physics.take_padded(physics.flat(out[key])[1], index, mask, f.dtype)
        truncated[obj] += int(np.clip(n_kept - m, 0, None).sum())
        arrays[f"common/{obj}/n"] = mask.sum(axis=1).astype(np.int32)
        arrays[f"common/{obj}/mask"] = mask
    for obj in ("met", "event"):
        for f in features_for(obj, experiment):
            arrays[f"{f.group}/{obj}/{f.name}"] = np.asarray(out[f"{f.group}/{obj}/{f.name}"]).astype(f.dtype)
    return arrays


def stored_jet_constituents(out: dict, pt_cuts: dict, max_jets: int) -> dict:
    """The chunk's constituent table placed on the stored jets (the same cut, order and cap as finish_chunk)."""
    offsets, pt = physics.flat(out["common/jets/pt"])
    index, mask, _ = physics.padded_index(offsets, pt, pt > pt_cuts["jets"], max_jets)
    table = out["jet_constituents"]
    return jet_constituents.place(table["jet"], {k: v for k, v in table.items() if k != "jet"}, index, mask, len(pt))


def h5_chunk_events(step: int, most: int = 4096) -> int:
    """HDF5 chunk length: at most `most` events, and a divisor of --step where one is near, so every
    append writes whole chunks (the writer keeps no chunk cache; a partial chunk is re-read)."""
    return math.ceil(step / math.ceil(step / most))


def file_metadata(f, first_chunk_dsid, settings) -> dict:
    """process / dsid / cross-section: command line first, then the file's generator tree, then unknown."""
    gen = physlite.read_generator_metadata(f)
    dsid = settings["dsid"] if settings["dsid"] is not None else gen.get("dsid", first_chunk_dsid)
    return {"process": settings["process"] or gen.get("process", "unknown"),
            "dsid": int(dsid) if dsid is not None else MISSING_INT,
            "cross_section_pb": float(settings["cross_section"] if settings["cross_section"] is not None
                                      else gen.get("cross_section_pb", np.nan)),
            "sum_weights_from_file": gen.get("sum_weights")}


def convert_file(path: str, settings: dict) -> str:
    """One ROOT file -> <out_dir>/<stem>.h5, chunk by chunk; returns the output's path. `settings`: out_dir,
    experiment, pt_cuts, max_objects, step, overwrite, seed, process, dsid, cross_section, constituents, provenance."""
    out_path = Path(settings["out_dir"]) / f"{Path(path).stem}.h5"
    if out_path.exists() and not settings["overwrite"]:
        print(f"skip {out_path} (exists; --overwrite to redo)", file=sys.stderr)
        return str(out_path)
    remove_stale_temps(out_path)
    reader, experiment, f, source = open_reader(path, settings["experiment"], settings["pt_cuts"],
                                                settings["constituents"])
    if settings["constituents"] == "auto" and reader.constituents == "delta_r":
        print(f"note: {path}: no jet-constituent association in this file, tracks within dR < "
              f"{CONSTITUENT_DELTA_R} of the jet axis are used", file=sys.stderr)
    absent = [m.removesuffix(": all") for m in reader.missing if m.endswith(": all")]
    if absent:
        notes = "".join(f"; {note}" for note in reader.notes)
        print(f"warning: {path}: no {', '.join(absent)} in this file, written as zero objects{notes}", file=sys.stderr)
    features = [m for m in reader.missing if not m.endswith(": all")]
    if features:
        print(f"warning: {path}: absent in this file, filled with NaN/{MISSING_INT}: {', '.join(features)}",
              file=sys.stderr)
    truncated = {obj: 0 for obj in LIST_OBJECTS}
    constituent_features = features_for("jet_constituents", experiment)
    sum_weights, dsid, done, t0 = 0.0, None, 0, time.perf_counter()
    with H5EventWriter(out_path, chunk_events=h5_chunk_events(settings["step"])) as writer, \
            tqdm(total=reader.n_events, unit="evt", desc=Path(path).name, leave=False, mininterval=1.0) as bar:
        chunks = reader.chunks(settings["step"])
        while True:
            try:
                chunk = next(chunks, None)
            except Exception as exc:  # uproot's errors on a corrupt basket or page: many types
                if os.environ.get("TOKEVENT_DEBUG"):
                    traceback.print_exc()
                raise InputError(f"unreadable data after entry {done} ({type(exc).__name__}: {physlite._first_line(exc)})") from None
            if chunk is None:
                break
            n = len(chunk)
            out = reader.convert(chunk)
            arrays = finish_chunk(out, experiment, settings["pt_cuts"], settings["max_objects"], truncated)
            if reader.constituents:
                max_jets = settings["max_objects"]["jets"]
                placed = stored_jet_constituents(out, settings["pt_cuts"], max_jets)
                for lo in range(0, n, writer.chunk_events):
                    hi = min(lo + writer.chunk_events, n)
                    writer.append({**{k: v[lo:hi] for k, v in arrays.items()},
                                   **jet_constituents.dense(placed, lo, hi, max_jets, constituent_features)})
            else:
                writer.append(arrays)
            sum_weights += float(np.nansum(arrays["common/event/weight"].astype(np.float64)))
            if dsid is None and "atlas/event/mcChannelNumber" in arrays and n:
                dsid = int(arrays["atlas/event/mcChannelNumber"][0])
            done += n
            bar.update(n)
        if done != reader.n_events:
            raise InputError(f"read {done} of {reader.n_events} events")
        meta = file_metadata(f, dsid, settings)
        from_file = meta.pop("sum_weights_from_file")
        writer.close({
            "experiment": experiment, "input_file": str(path), "input_tree": source,
            "git_hash": settings["provenance"]["git_hash"],
            "pt_cuts": settings["pt_cuts"], "max_objects": settings["max_objects"],
            "common_iso_cone": ISO_CONE, "common_iso_pt_floor_gev": ISO_PT_FLOOR_GEV,
            "common_iso_z0sintheta_cut_mm": ISO_Z0SINTHETA_CUT_MM, **meta,
            "sum_weights": float(from_file) if from_file is not None else sum_weights,
            "sum_weights_source": "generator metadata tree" if from_file is not None else "sum of nominal weights of the converted events",
            "missing_features": reader.missing, "met_definition": reader.met_definition,
            "branch_sources": reader.sources(), "truncated_objects": truncated,
            "jet_constituents": jet_constituents.metadata(reader.constituents, *reader.links_seen),
            "seed": settings["seed"], "provenance": settings["provenance"],
        })
    rate = done / max(time.perf_counter() - t0, 1e-9)
    print(f"wrote {out_path} ({done} events, {experiment} {source}, {rate:.0f} events/s)", file=sys.stderr)
    return str(out_path)
