"""Small synthetic step1 HDF5 files and matching step2-style token Parquet files for the step3 /
step4 tests (written through common.h5io and common.token_parquet, so the real readers run).

Processes differ the way the real ones do: hzz4l has four leptons with harder pT than zz4l,
ttbar has b-jets and few leptons, dy two leptons. Tokens are a plain binning (level 0: log pT
bin, level 1: eta bin), so a model has real structure to learn: codes are pT-ordered within
a type and the lepton pT scale is shared by all leptons of an event.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the step scripts, imported to call their main(argv) in-process

from common.h5io import H5EventWriter
from common.schema import CLS, OBJECTS, SEP, SEQUENCE_OBJECTS, TYPE_IDS, dataset_path, features_for
from common.token_parquet import sequences_table, write_sequences
from session_cache import built_once

MAX_OBJECTS = {"electrons": 4, "muons": 4, "taus": 2, "photons": 2, "jets": 6, "tracks": 6}
CAPS = {"electrons": 4, "muons": 4, "taus": 2, "photons": 2, "jets": 5, "tracks": 4}
CODES = 16  # codes per (object, level)
LEVELS = 2
EVENT_BINS = 8
PROCESSES = {"hzz4l": 345060, "zz4l": 345108, "ttbar": 410470, "dy": 700322}


def make_vocab(codes: int = CODES, tokenizer_tag: str = "synthetic-v1") -> dict:
    ranges, start = {}, 4 + EVENT_BINS
    for obj in SEQUENCE_OBJECTS + ("met",):
        ranges[obj] = [[start + l * codes, codes] for l in range(LEVELS)]
        start += LEVELS * codes
    max_length = 2 + sum(CAPS.values()) + len(SEQUENCE_OBJECTS) + 1
    return {"levels": LEVELS, "vocab_size": start, "type_ids": dict(TYPE_IDS), "ranges": ranges,
            "event_tokens": {"offset": 4, "size": EVENT_BINS, "mu_edges": list(np.linspace(0, 80, EVENT_BINS + 1)[1:-1])},
            "layout": "[CLS] [EVENT] e.. [SEP] mu.. [SEP] tau.. [SEP] gamma.. [SEP] jet.. [SEP] track.. [SEP] [MET]",
            "caps": dict(CAPS), "max_length": max_length,
            "tokenizers": {obj: {"checksum": f"{tokenizer_tag}-{obj}"} for obj in ranges}}


def _multiplicities(process: str, n: int, rng) -> dict[str, np.ndarray]:
    if process in ("hzz4l", "zz4l"):
        n_e = rng.choice([0, 2, 4], n)
        return {"electrons": n_e, "muons": 4 - n_e, "jets": rng.poisson(1.0 if process == "hzz4l" else 0.7, n)}
    if process == "ttbar":
        return {"electrons": rng.binomial(1, 0.4, n), "muons": rng.binomial(1, 0.4, n), "jets": 3 + rng.poisson(1.5, n)}
    two_e = rng.random(n) < 0.5
    return {"electrons": np.where(two_e, 2, 0), "muons": np.where(two_e, 0, 2), "jets": rng.poisson(0.8, n)}


PT_SCALE = {"hzz4l": 35.0, "zz4l": 22.0, "ttbar": 40.0, "dy": 28.0}


def _feature_values(obj: str, feat, shape, scale, rng):
    if feat.name == "pt":
        return np.sort(scale[..., None] * rng.gamma(10.0, 0.15, shape) + 5.0, axis=-1)[..., ::-1] if len(shape) == 2 \
            else scale * rng.gamma(2.0, 0.5, shape)
    if feat.kind == "angle":
        return rng.uniform(-np.pi, np.pi, shape)
    if feat.kind in ("flag", "category"):
        return rng.choice(feat.categories or (0, 1), shape)
    if feat.kind == "score":
        return rng.dirichlet([1, 1, 4], shape)[..., "bcu".index(feat.name[-1]) if feat.name[-1] in "bcu" else 0]
    if feat.name in ("eta", "d0", "z0", "pvx", "pvy", "pvz"):
        return rng.normal(0, 1.2, shape)
    return rng.gamma(2.0, 1.0, shape)


def make_h5(path: Path, process: str, n: int, seed: int, negative_fraction: float = 0.0,
            cross_section: float | None = None) -> dict[str, np.ndarray]:
    """Write one HDF5 file; returns the arrays (for building the tokens). negative_fraction: that share
    of the events gets generator weight -1 (an NLO-like sample); cross_section: the /metadata
    cross_section_pb and sum_weights that --weighting xsec reads (none by default)."""
    rng = np.random.default_rng([seed, PROCESSES[process]])
    mult = _multiplicities(process, n, rng)
    mult.update(taus=rng.poisson(0.2, n), photons=rng.poisson(0.3, n), tracks=rng.poisson(2.0 if process == "ttbar" else 1.0, n))
    scale = PT_SCALE[process] * rng.gamma(8.0, 1 / 8.0, n)  # an event-wide pT scale: context to learn
    axis_eta, axis_phi = rng.normal(0, 1.0, n), rng.uniform(-np.pi, np.pi, n)
    arrays = {}
    for obj in SEQUENCE_OBJECTS:
        m = MAX_OBJECTS[obj]
        nobj = np.minimum(mult[obj], m).astype(np.int32)
        mask = np.arange(m)[None] < nobj[:, None]
        for f in features_for(obj, "atlas"):
            v = _feature_values(obj, f, (n, m), scale if obj != "jets" else scale * 1.5, rng)
            if f.name == "eta":  # objects of an event share its rapidity: context a masked object can be told from
                v = axis_eta[:, None] + rng.normal(0, 0.3, (n, m))
            if f.name == "phi":  # and alternate back to back around its axis
                v = (axis_phi[:, None] + np.pi * (np.arange(m)[None] % 2) + rng.normal(0, 0.2, (n, m)) + np.pi) % (2 * np.pi) - np.pi
            if obj == "jets" and f.name == "GN2_pb":  # ttbar: two b-jets
                v = np.where((process == "ttbar") & (np.arange(m)[None] < 2), 0.9, 0.02) * np.ones((n, m))
            if obj == "jets" and f.name in ("GN2_pc", "GN2_pu"):
                v = np.full((n, m), 0.05 if f.name == "GN2_pc" else 0.9)
            arrays[dataset_path(obj, f)] = np.where(mask, v, 0).astype(f.dtype)
        arrays[f"common/{obj}/mask"], arrays[f"common/{obj}/n"] = mask, nobj
    for obj in ("met", "event"):
        for f in features_for(obj, "atlas"):
            arrays[dataset_path(obj, f)] = _feature_values(obj, f, (n,), scale, rng).astype(f.dtype)
    arrays["common/event/mu"] = rng.uniform(10, 70, n).astype(np.float32)
    arrays["common/event/weight"] = np.where(rng.random(n) < negative_fraction, -1, 1).astype(np.float32)
    meta = {"experiment": "atlas", "process": process, "dsid": PROCESSES[process], "input_file": f"{process}.root"}
    if cross_section is not None:
        meta.update(cross_section_pb=cross_section, sum_weights=float(arrays["common/event/weight"].sum()))
    with H5EventWriter(path) as w:
        w.append(arrays)
        w.close(meta)
    return arrays


def _bins(x, lo, hi, codes=CODES):
    return np.clip(((x - lo) / (hi - lo) * codes).astype(np.int64), 0, codes - 1)


def tokens_from_arrays(arrays: dict, vocab: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (N,L,Q), types (N,L), lengths) in the docs/DESIGN.md layout, vectorised."""
    n = len(arrays["common/met/pt"])
    ids, types, valid = [], [], []

    def block(t, codes, ok):
        ids.append(codes), types.append(np.full(ok.shape, t)), valid.append(ok)

    one = np.ones((n, 1), bool)
    block(1, np.stack([np.full((n, 1), CLS), np.zeros((n, 1), int)], -1), one)
    ev = vocab["event_tokens"]["offset"] + np.digitize(arrays["common/event/mu"], vocab["event_tokens"]["mu_edges"])
    block(TYPE_IDS["event"], np.stack([ev[:, None], np.zeros((n, 1), int)], -1), one)
    for obj in SEQUENCE_OBJECTS + ("met",):
        (s0, c0), (s1, c1) = vocab["ranges"][obj]
        if obj == "met":
            pt, eta, ok = arrays["common/met/pt"][:, None], np.zeros((n, 1)), one
        else:
            cap = CAPS[obj]
            pt, eta = arrays[f"common/{obj}/pt"][:, :cap], arrays[f"common/{obj}/eta"][:, :cap]
            ok = arrays[f"common/{obj}/mask"][:, :cap]
        codes = np.stack([s0 + _bins(np.log(np.maximum(pt, 1.0)), 1.0, 5.5), s1 + _bins(eta, -3, 3)], -1)
        block(OBJECTS[obj].type_id, codes, ok)
        if obj != "met":
            block(SEP, np.stack([np.full((n, 1), SEP), np.zeros((n, 1), int)], -1), one)
    ids, types, valid = np.concatenate(ids, 1), np.concatenate(types, 1), np.concatenate(valid, 1)
    order = np.argsort(~valid, axis=1, kind="stable")  # pack the stored positions to the front
    ids = np.take_along_axis(ids, order[..., None], 1)
    types = np.take_along_axis(types, order, 1)
    lengths = valid.sum(1)
    return ids, types, lengths


def make_sample(root: Path, n: int = 600, seed: int = 3, processes=tuple(PROCESSES), vocab: dict | None = None,
                name_suffix: str = "", negative_fraction: float = 0.0, cross_sections: dict | None = None) -> dict:
    """HDF5 under root/h5, Parquet under root/tokens for each process. Returns the paths.
    negative_fraction and cross_sections (process -> pb): see make_h5."""
    vocab = vocab or make_vocab()
    out = sample_paths(root, processes, name_suffix) | {"vocab": vocab}
    for proc in processes:
        h5, pq_path = out["h5"][proc], out["parquet"][proc]
        arrays = make_h5(h5, proc, n, seed, negative_fraction, (cross_sections or {}).get(proc))
        ids, types, lengths = tokens_from_arrays(arrays, vocab)
        table = sequences_table(ids, types, lengths, np.arange(n), h5.name, proc, PROCESSES[proc],
                                arrays["common/event/weight"])
        prov = {"script": "tests/finetune_fixtures.py", "inputs": [str(h5)], "settings": {"tokenizers": str(root / "tok")}}
        write_sequences(pq_path, [table], vocab, prov)
    return out


def sample_paths(root: Path, processes, name_suffix: str = "") -> dict:
    return {"h5": {p: root / "h5" / f"{p}{name_suffix}.h5" for p in processes},
            "parquet": {p: root / "tokens" / f"{p}{name_suffix}.parquet" for p in processes}}


# --- one sample and one pretraining, shared by test_pretrain.py and test_finetune.py ----------------------

SHARED_EVENTS = 1200  # per process
# Three objectives at once; strong enough to beat the no-context baselines clearly (asserted in test_pretrain.py),
# small enough to be quick.
PRETRAIN_ARGS = ["--objective", "features,tokens,event", "--epochs", "5", "--lr", "3e-3", "--mask-prob", "0.3", "--dropout", "0",
                 "--d-model", "32",
                 "--n-heads", "2", "--d-ff", "64", "--batch-size", "64", "--threads", "1", "--no-plots"]


def call_main(main, *argv) -> int:
    """A step script's main(argv) in-process; returns its exit code, die() and argparse exits included.
    Saves the ~4 s torch import of a subprocess; the caller reads stdout/stderr with capsys."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def shared_sample(tmp_path_factory) -> dict:
    """make_sample(n=SHARED_EVENTS) plus one step3 run on it (PRETRAIN_ARGS), made once per pytest session
    (session_cache). Adds "pretrain" (its out-dir), "init" (backbone.pt) and "root". Tests must not modify
    these files."""
    def build(root: Path) -> None:
        import step3_pretrain

        sample = make_sample(root, n=SHARED_EVENTS)
        code = call_main(step3_pretrain.main, "--parquet", *sample["parquet"].values(), "--out-dir", root / "pre",
                         "--no-code-geometry", "--pair-bias", "0", *PRETRAIN_ARGS)  # synthetic tokens: no tokenizers behind them
        assert code == 0, f"the shared pretraining failed with exit code {code}"

    root = built_once(tmp_path_factory, "shared_pretraining", build)
    return sample_paths(root, PROCESSES) | {"vocab": make_vocab(), "pretrain": root / "pre", "init": root / "pre" / "backbone.pt",
                                            "root": root}
