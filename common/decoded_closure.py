"""Decoded-physics closure of a set of fitted tokenizers: the event-level quantities an analysis
computes, from the objects as step1 stored them and from the same objects after encode + decode,
on held-out events (the `test` split of common.token_parquet.split_of, as the fit's quality).

Per event, each side on its own (decoded objects are re-ordered by their decoded pT, as an
analysis of decoded objects would):
  m4l, mZ1, mZ2  the four leading leptons (electrons and muons merged, pT-ordered:
                 common.highlevel.leading_leptons) and the Z-candidate pairing of common.physics.z_pairing
  mll            the two leading leptons, whatever their flavour and charge (mZ1 is the
                 same-flavour opposite-sign one); dr_ll their Delta R
  mjj, dr_jj     the two leading jets (jet masses as decoded)
  met            the MET pT
Bias and resolution are those of the fit's quality (common.tokenizer_quality.robust: median, half
the 16-84% interval) of (decoded - original) / original, or of decoded - original for Delta R,
over the events where both sides define the quantity; events where only one side does (a
decoded charge that breaks a pair) are counted. Memory: one chunk of events at a time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common import h5io, runtime
from common.highlevel import leading_leptons
from common.object_stream import CHUNK_EVENTS, heldout
from common.physics import delta_r, invariant_mass, p4, z_pairing
from common.schema import OBJECTS, TYPE_IDS
from common.tokenizer import COMBINED, TYPE_FEATURE, Tokenizer, folder_granularity, load_tokenizer, tokenizer_name
from common.tokenizer_quality import robust

MAX_EVENTS = 50_000  # held-out events decoded (the run_all sample has about 4 900)
LEPTONS = ("electrons", "muons")
KINEMATICS = {"electrons": ("pt", "eta", "phi", "charge"), "muons": ("pt", "eta", "phi", "charge"),
              "jets": ("pt", "eta", "phi", "mass"), "met": ("pt",)}  # what the quantities read
# name: (objects it needs, difference: relative (decoded/original - 1) or absolute, unit)
QUANTITIES = {"m4l": (LEPTONS, "relative", "GeV"), "mZ1": (LEPTONS, "relative", "GeV"),
              "mZ2": (LEPTONS, "relative", "GeV"), "mll": (LEPTONS, "relative", "GeV"),
              "dr_ll": (LEPTONS, "absolute", ""), "mjj": (("jets",), "relative", "GeV"),
              "dr_jj": (("jets",), "absolute", ""), "met": (("met",), "relative", "GeV")}
# the goals: quantity -> (resolution at most, |bias| at most or None)
GOALS = {"m4l": (0.01, 0.003), "mll": (0.01, 0.003), "mjj": (0.03, None), "met": (0.03, None)}


def tokenizers_in(tok_dir: str | Path) -> dict[str, Tokenizer]:
    """The tokenizers of the objects the quantities read, as step2 apply picks them: the combined
    one when the folder holds it, each object's <obj>.kinematics.pt in granularity group (every
    quantity reads kinematics only), else each object's <obj>.pt that is there."""
    tok_dir = Path(tok_dir)
    granularity = folder_granularity(tok_dir, KINEMATICS)
    if granularity == COMBINED:
        tok = load_tokenizer(tok_dir / f"{COMBINED}.pt")
        return {obj: tok for obj in KINEMATICS if tokenizer_features(tok, obj)}
    if granularity == "group":
        return {obj: load_tokenizer(p) for obj in KINEMATICS
                if (p := tok_dir / f"{tokenizer_name(obj, 'kinematics')}.pt").exists()}
    return {obj: load_tokenizer(tok_dir / f"{obj}.pt") for obj in KINEMATICS if (tok_dir / f"{obj}.pt").exists()}


def reconstruct_objects(tok: Tokenizer, obj: str, feats: dict[str, np.ndarray],
                        events: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(codes, decoded) of flat objects of one type, each object's event given (the context of a
    transformer encoder); the combined tokenizer takes '<obj>/<name>' + the type."""
    if tok.obj != COMBINED:
        return tok.reconstruct(feats, events)
    n = len(next(iter(feats.values())))
    named = {f"{obj}/{k}": v for k, v in feats.items()}
    codes, rec = tok.reconstruct({**named, TYPE_FEATURE: np.full(n, TYPE_IDS[obj])})
    return codes, {k.split("/", 1)[1]: v for k, v in rec.items() if k.startswith(f"{obj}/")}


def decode_objects(tok: Tokenizer, obj: str, feats: dict[str, np.ndarray], events: np.ndarray) -> dict[str, np.ndarray]:
    """Encode + decode flat objects of one type."""
    return reconstruct_objects(tok, obj, feats, events)[1]


def tokenizer_features(tok: Tokenizer, obj: str) -> list[str]:
    """The feature names of `obj` a tokenizer encodes (the combined one's without '<obj>/')."""
    if tok.obj != COMBINED:
        return tok.features
    return [n.split("/", 1)[1] for n in tok.features if n.startswith(f"{obj}/")]


def _keys(obj: str, names: list[str], experiment: str) -> dict[str, str]:
    """{feature: dataset} of a tokenizer's features in a file of this experiment."""
    return {f.name: f"{f.group}/{obj}/{f.name}" for f in OBJECTS[obj].features
            if f.name in names and f.group in ("common", experiment)}


def decoded_chunk(c: dict[str, np.ndarray], toks: dict[str, Tokenizer], experiment: str) -> dict[str, np.ndarray]:
    """The chunk's kinematic arrays ('common/<obj>/<name>', padded) with every tokenized object
    replaced by its decoded self (padding and masks unchanged)."""
    out = {}
    for obj, tok in toks.items():
        keys = _keys(obj, tokenizer_features(tok, obj), experiment)
        if OBJECTS[obj].per_event:
            rec = decode_objects(tok, obj, {k: c[p] for k, p in keys.items()}, np.arange(len(c[f"common/{obj}/pt"])))
            out.update({f"common/{obj}/{k}": rec[k] for k in KINEMATICS[obj]})
            continue
        mask = c[f"common/{obj}/mask"].astype(bool)
        rec = decode_objects(tok, obj, {k: c[p][mask] for k, p in keys.items()}, np.nonzero(mask)[0])
        for k in KINEMATICS[obj]:
            a = np.zeros(mask.shape, np.float64)
            a[mask] = rec[k]
            out[f"common/{obj}/{k}"] = a
        out[f"common/{obj}/mask"] = mask
    return out


def _leading(c: dict, obj: str, n: int):
    """(pt, eta, phi, mass) (events, n) of the n leading objects by pT (zeros where absent), and
    how many the event has."""
    mask = c[f"common/{obj}/mask"].astype(bool)
    pt = np.where(mask, c[f"common/{obj}/pt"], 0.0).astype(np.float64)
    order = np.argsort(-pt, axis=1, kind="stable")[:, :n]
    take = lambda k: np.take_along_axis(np.where(mask, c[f"common/{obj}/{k}"], 0.0).astype(np.float64), order, 1)  # noqa: E731
    return take("pt"), take("eta"), take("phi"), take("mass"), mask.sum(1)


def _eta_phi(p):
    """(eta, phi) of (..., 4) four-vectors."""
    pt = np.hypot(p[..., 1], p[..., 2])
    return np.arcsinh(p[..., 3] / np.maximum(pt, 1e-12)), np.arctan2(p[..., 2], p[..., 1])


def event_quantities(c: dict[str, np.ndarray], objects) -> dict[str, np.ndarray]:
    """The QUANTITIES whose objects are all in `objects`, per event (NaN where undefined), from a
    chunk of 'common/<obj>/<name>' arrays (the step1 layout)."""
    out = {}
    if all(o in objects for o in LEPTONS):
        lep, fl, ch, _ = leading_leptons(c)
        n_lep = (fl >= 0).sum(1)
        z1, z2, _ = z_pairing(lep, fl, ch)
        eta, phi = _eta_phi(lep[:, :2])
        out.update({"m4l": np.where(n_lep >= 4, invariant_mass(lep.sum(1)), np.nan), "mZ1": z1, "mZ2": z2,
                    "mll": np.where(n_lep >= 2, invariant_mass(lep[:, :2].sum(1)), np.nan),
                    "dr_ll": np.where(n_lep >= 2, delta_r(eta[:, 0], phi[:, 0], eta[:, 1], phi[:, 1]), np.nan)})
    if "jets" in objects:
        pt, eta, phi, m, n = _leading(c, "jets", 2)
        if pt.shape[1] == 2:
            two = n >= 2
            out["mjj"] = np.where(two, invariant_mass(p4(pt, eta, phi, np.maximum(m, 0.0)).sum(1)), np.nan)
            out["dr_jj"] = np.where(two, delta_r(eta[:, 0], phi[:, 0], eta[:, 1], phi[:, 1]), np.nan)
    if "met" in objects:
        out["met"] = np.asarray(c["common/met/pt"], np.float64)
    return out


def _read_keys(toks: dict[str, Tokenizer], experiment: str) -> list[str]:
    keys = set()
    for obj, tok in toks.items():
        keys |= set(_keys(obj, tokenizer_features(tok, obj), experiment).values())
        keys |= {f"common/{obj}/{k}" for k in KINEMATICS[obj]}
        if not OBJECTS[obj].per_event:
            keys.add(f"common/{obj}/mask")
    return sorted(keys)


def heldout_quantities(toks: dict[str, Tokenizer], infos: list[dict], max_events: int = MAX_EVENTS):
    """(original, decoded) {quantity: (events,)} on up to max_events held-out events. The files
    take turns chunk by chunk, so a bound below the total still samples every file."""
    chunks = sorted((lo, i) for i, info in enumerate(infos) for lo in range(0, info["n_events"], CHUNK_EVENTS))
    orig, dec, seen = {}, {}, 0
    for lo, i in chunks:
        if seen >= max_events:
            break
        info = infos[i]
        hi = min(lo + CHUNK_EVENTS, info["n_events"])
        _, c = next(h5io.iter_chunks(info["path"], _read_keys(toks, info["experiment"]), step=CHUNK_EVENTS, start=lo, stop=hi))
        events = np.nonzero(heldout(info["path"], lo, hi - lo))[0][: max_events - seen]
        if not len(events):
            continue
        seen += len(events)
        c = {k: v[events] for k, v in c.items()}
        for side, chunk in ((orig, c), (dec, decoded_chunk(c, toks, info["experiment"]))):
            for k, v in event_quantities(chunk, toks).items():
                side.setdefault(k, []).append(v)
    if not seen:
        raise ValueError("no held-out events to measure the closure on")
    return ({k: np.concatenate(v) for k, v in orig.items()}, {k: np.concatenate(v) for k, v in dec.items()})


def closure_figures(orig: dict[str, np.ndarray], dec: dict[str, np.ndarray]) -> dict:
    """Per quantity: bias and resolution over the events where both sides define it, the counts,
    and the goals (None where the quantity was not measured)."""
    quantities = {}
    for name, (objects, difference, unit) in QUANTITIES.items():
        if name not in orig:
            continue
        o, d = orig[name], dec[name]
        both = np.isfinite(o) & np.isfinite(d) & ((o > 0) if difference == "relative" else True)
        diff = d[both] / o[both] - 1 if difference == "relative" else d[both] - o[both]
        quantities[name] = {"objects": list(objects), "difference": difference, "unit": unit, **robust(diff),
                            "n_original": int(np.isfinite(o).sum()), "n_decoded": int(np.isfinite(d).sum())}
    goals = {}
    for name, (res_max, bias_max) in GOALS.items():
        q = quantities.get(name, {})
        ok = None if not q.get("n") else q["resolution"] <= res_max and (bias_max is None or abs(q["bias"]) <= bias_max)
        goals[f"{name}_resolution_le_{res_max * 100:g}pct" + (f"_bias_le_{bias_max * 100:g}pct" if bias_max else "")] = ok
    return {"quantities": quantities, "goals": goals}


def write_closure(tok_dir: str | Path, infos: list[dict], max_events: int = MAX_EVENTS) -> dict | None:
    """Measure the closure of the tokenizers in tok_dir on the held-out events of `infos`
    (object_stream.describe_file) and write closure.json (+ closure.npz, the per-event values the
    plots read). None when the tokenizers in tok_dir do not make up any of the quantities."""
    tok_dir = Path(tok_dir)
    toks = tokenizers_in(tok_dir)
    if not toks:
        return None
    orig, dec = heldout_quantities(toks, infos, max_events)
    if not orig:  # e.g. electrons alone: no quantity is made of these objects only
        return None
    out = {"n_events": int(len(next(iter(orig.values())))), "max_events": max_events,
           "tokenizers": {o: {"path": Path(t.path).name, "sha256": t.sha256} for o, t in toks.items()},
           **closure_figures(orig, dec), "inputs": [i["path"] for i in infos]}
    with runtime.atomic_output(tok_dir / "closure.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **{f"orig/{k}": v for k, v in orig.items()}, **{f"decoded/{k}": v for k, v in dec.items()})
    runtime.write_json(tok_dir / "closure.json", out)
    return out

