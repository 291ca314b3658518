"""The physicists' high-level variables from a step1 HDF5 file, for the "standard classifier".

Leptons are the electrons and muons of /common merged and pT-ordered. The four leading
leptons form the 4l candidate; Z1 is the same-flavour opposite-sign (SFOS) pair closest to
the Z mass and Z2 the other pair of the same pairing (the standard H->4l pairing). b-jets
are common.physics.is_bjet (the one b-jet definition). The production-mode variables: the two
leading jets of any |eta| (VBF tagging jets are forward) give m_jj and |delta eta_jj| when both have
pT > VBF_JET_PT_MIN; leptons beyond the four of the candidate (from a W or Z of VH) are counted. Every function is vectorised over
events; events without a valid candidate get NaN (gradient boosting handles it).
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import h5py
import numpy as np

from common.h5io import iter_chunks
from common.physics import BJET_TAGGER, LEPTON_MASS, invariant_mass, is_bjet, p4, z_pairing
from common.schema import OBJECTS, dataset_path

N_LEPTONS = 4
JET_PT_MIN = 25.0  # GeV, jets counted
VBF_JET_PT_MIN = 30.0  # GeV: the two tagging jets of m_jj and delta eta_jj

NAMES = ("n_electrons", "n_muons", "n_leptons", "n_extra_leptons", "lep1_pt", "lep2_pt", "lep3_pt", "lep4_pt",
         "m4l", "pt4l", "mZ1", "mZ2", "met", "met_sumet", "n_jets", "n_bjets", "ht", "jet1_pt", "jet2_pt",
         "m_jj", "deta_jj")


def _keys(f: h5py.File) -> list[str]:
    keys = [f"common/{o}/{v}" for o in LEPTON_MASS for v in ("pt", "eta", "phi", "charge", "mask")]
    keys += [f"common/jets/{v}" for v in ("pt", "eta", "phi", "mass", "mask")] + ["common/met/pt", "common/met/sumet"]
    keys += [k for k in BTAG_KEYS if k in f]
    return keys


BTAG_KEYS = tuple(dataset_path("jets", OBJECTS["jets"].feature(f"{BJET_TAGGER}_{s}")) for s in ("pb", "pc", "pu"))


def leading_leptons(c: dict[str, np.ndarray], n: int = N_LEPTONS):
    """(p4 (N,n,4), flavour (N,n) 0 e / 1 mu / -1 none, charge (N,n), pt (N,n)) of the n leading leptons."""
    p4s, fl, ch, pts = [], [], [], []
    for k, (obj, mass) in enumerate(LEPTON_MASS.items()):
        m = c[f"common/{obj}/mask"].astype(bool)
        pt = np.where(m, c[f"common/{obj}/pt"], 0.0).astype(np.float64)
        p4s.append(p4(pt, c[f"common/{obj}/eta"], c[f"common/{obj}/phi"], mass) * m[..., None])
        fl.append(np.where(m, k, -1))
        ch.append(np.where(m, c[f"common/{obj}/charge"], 0))
        pts.append(pt)
    pt = np.concatenate(pts, 1)
    order = np.argsort(-pt, axis=1, kind="stable")[:, :n]
    take = lambda a: np.take_along_axis(a, order if a.ndim == 2 else order[..., None], axis=1)
    out = [take(np.concatenate(p4s, 1)), take(np.concatenate(fl, 1)), take(np.concatenate(ch, 1)), take(pt)]
    if out[0].shape[1] < n:  # fewer lepton slots than n in the file: pad with "no lepton"
        pad = n - out[0].shape[1]
        out = [np.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=v)
               for a, v in zip(out, (0.0, -1, 0, 0.0))]
    return out


def compute(c: dict[str, np.ndarray]) -> np.ndarray:
    """One chunk of HDF5 arrays -> (N, len(NAMES)) float32 in the order of NAMES."""
    lep, fl, ch, pt = leading_leptons(c)
    n_lep = (fl >= 0).sum(1)
    four = lep.sum(1)
    has4 = n_lep >= 4
    z1, z2, _ = z_pairing(lep, fl, ch)
    jm = c["common/jets/mask"].astype(bool) & (c["common/jets/pt"] > JET_PT_MIN)
    if BTAG_KEYS[0] in c:
        n_b = (jm & is_bjet(c["common/jets/pt"], c["common/jets/eta"], *(c[k] for k in BTAG_KEYS))).sum(1)
    else:
        n_b = np.full(len(jm), np.nan)
    jpt = np.where(jm, c["common/jets/pt"], 0.0)
    n_all = c["common/electrons/mask"].sum(1) + c["common/muons/mask"].sum(1)
    cols = {
        "n_electrons": c["common/electrons/mask"].sum(1), "n_muons": c["common/muons/mask"].sum(1),
        "n_leptons": n_lep, "n_extra_leptons": np.maximum(n_all - N_LEPTONS, 0),
        **{f"lep{i + 1}_pt": np.where(fl[:, i] >= 0, pt[:, i], np.nan) for i in range(N_LEPTONS)},
        "m4l": np.where(has4, invariant_mass(four), np.nan), "pt4l": np.where(has4, np.hypot(four[:, 1], four[:, 2]), np.nan),
        "mZ1": z1, "mZ2": z2, "met": c["common/met/pt"], "met_sumet": c["common/met/sumet"],
        "n_jets": jm.sum(1), "n_bjets": n_b, "ht": jpt.sum(1), "jet1_pt": jpt.max(1, initial=0.0),
        **dijet(c),
    }
    return np.stack([np.asarray(cols[k], dtype=np.float32) for k in NAMES], axis=1)


def dijet(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """jet2_pt, m_jj and |delta eta_jj| of the two leading jets of any |eta| (NaN where undefined)."""
    jm, jpt, eta = c["common/jets/mask"].astype(bool), c["common/jets/pt"], c["common/jets/eta"]
    if jm.shape[1] < 2:
        nan = np.full(len(jm), np.nan)
        return {"jet2_pt": nan, "m_jj": nan, "deta_jj": nan}
    two = jm[:, 1] & (jpt[:, 1] > VBF_JET_PT_MIN)
    j = p4(jpt[:, :2].astype(np.float64), eta[:, :2], c["common/jets/phi"][:, :2], c["common/jets/mass"][:, :2])
    return {"jet2_pt": np.where(jm[:, 1], jpt[:, 1], np.nan), "m_jj": np.where(two, invariant_mass(j[:, 0] + j[:, 1]), np.nan),
            "deta_jj": np.where(two, np.abs(eta[:, 0] - eta[:, 1]), np.nan)}


BLOCK_CACHE = 64  # blocks of computed variables kept: at most 64 x 4096 events x 21 x 4 bytes = 22 MB
DEFAULT_BLOCK = 4096  # events per block of a file without HDF5 chunks


def for_rows(path: str | os.PathLike, rows: Sequence[int]) -> np.ndarray:
    """High-level variables of the given event rows of one HDF5 file, computed a block of events at a time (the
    file's HDF5 chunk) and the last BLOCK_CACHE blocks kept: step3 asks for about 1 000 rows at a time, and each ask
    used to decompress and compute the whole chunk again, 3.6% of a pass (bench/README.md, "The kept blocks")."""
    rows = np.asarray(rows, dtype=np.int64)
    with h5py.File(path, "r") as f:
        keys, met = tuple(_keys(f)), f["common/met/pt"]
        total, block = met.shape[0], (met.chunks or (DEFAULT_BLOCK,))[0]
    if len(rows) and (rows.min() < 0 or rows.max() >= total):
        raise ValueError(f"{path}: an event_index outside the file's {total} events")
    stat = os.stat(path)
    out = np.empty((len(rows), len(NAMES)), dtype=np.float32)
    index = rows // block
    for b in np.unique(index):
        sel = index == b
        lo = int(b) * block
        out[sel] = _block(os.fspath(path), stat.st_mtime_ns, stat.st_size, keys, lo, block)[rows[sel] - lo]
    return out


@functools.lru_cache(maxsize=BLOCK_CACHE)
def _block(path: str, mtime_ns: int, size: int, keys: tuple[str, ...], lo: int, n: int) -> np.ndarray:
    """The variables of events lo..lo+n of one file; its modification time and size are in the cache's key, so a
    rewritten file is read again."""
    _, chunk = next(iter_chunks(path, keys, step=n, start=lo, stop=lo + n))
    return compute(chunk)


def for_events(source_files: np.ndarray, rows: np.ndarray, h5_files: dict) -> np.ndarray:
    """The variables of events named by (source HDF5 file name, row), each file read once;
    h5_files maps a source_file name to its path."""
    x = np.full((len(rows), len(NAMES)), np.nan, dtype=np.float32)
    for name in np.unique(source_files):
        if name not in h5_files:
            raise ValueError(f"no HDF5 file for source_file {name} (use --h5-dir)")
        sel = source_files == name
        x[sel] = for_rows(h5_files[name], rows[sel])
    return x
