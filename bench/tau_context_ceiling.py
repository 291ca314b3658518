"""How much of a masked tau its event tells: a gradient-boosted regressor of the tau's quantised
latent (step3's default target, the sum of its codebook vectors, standardised on the train taus)
from hand-made context, with step3's split, units and interval (common.training.RegressionStats).
Its context gain is the yardstick for the transformer's taus in step3's metrics.json.

In the detector simulation a tau is a jet with one or three tracks faking one, or a true hadronic
tau whose visible decay makes such a jet (common/detector.py), so the context is: the candidate jets
(the fake-tau selection of common.detector: one or three tracks, pT and |eta| cuts), their count and
the leading three's pT, eta, phi, track count and width; the five leading jets; the electron, muon
and photon counts; MET; the tau's rank and the number of taus. `--jets tokens` reads the jets
through their tokens (encoded and decoded with the run's jet tokenizer), as the transformer does.

  python bench/tau_context_ceiling.py --run runs/default                # exact jets
  python bench/tau_context_ceiling.py --run runs/default --jets tokens  # jets as the tokens keep them

It reads each HDF5 file whole (its taus, jets and counts): meant for run_all-sized runs, not for
the tens of millions of events the steps stream.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingRegressor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import detector  # noqa: E402
from common.runtime import EXIT_SOME_FAILED, die, first_line  # noqa: E402
from common.token_parquet import SPLITS, split_of  # noqa: E402
from common.tokenizer import load_tokenizer  # noqa: E402
from common.training import RegressionStats  # noqa: E402

CANDIDATES = 3  # leading candidate jets described
LEADING_JETS = 5
CANDIDATE_FEATURES = ("pt", "eta", "phi", "QG_nTracks", "QG_tracksWidth")
JET_FEATURES = ("pt", "eta", "phi", "mass", "QG_nTracks")
COUNTED = ("electrons", "muons", "photons")
GBDT = dict(max_iter=200, learning_rate=0.05, max_leaf_nodes=15)  # half sklearn's rate, twice its iterations and
#                                                                   smaller trees: run_all holds 1 657 train taus


def read_objects(f: h5py.File, obj: str, names) -> tuple[dict, np.ndarray]:
    """(feature -> (n_events, max_objects), mask) of one object type, from either feature group."""
    feats = {n: f[f"{g}/{obj}/{n}"][:] for n in names for g in ("common", "atlas") if f"{g}/{obj}/{n}" in f}
    return feats, f[f"common/{obj}/mask"][:].astype(bool)


def jets_through_tokens(jets: dict, mask: np.ndarray, tok) -> dict:
    """The jets as the token sequence keeps them: every tokenized feature encoded and decoded."""
    events = np.repeat(np.arange(len(mask)), mask.sum(1))
    _, rec = tok.reconstruct({k: v[mask] for k, v in jets.items()}, events)
    out = {k: v.copy() for k, v in jets.items()}
    for k in rec.keys() & out.keys():
        out[k][mask] = rec[k]
    return out


def leading(values: dict, names, order: np.ndarray, ok: np.ndarray, k: int) -> list[np.ndarray]:
    """The named features of the first k objects in `order` (NaN where there is none)."""
    idx, present = order[:, :k], np.take_along_axis(ok, order[:, :k], 1)
    return [np.where(present, np.take_along_axis(values[n], idx, 1), np.nan) for n in names]


def context(jets: dict, jmask: np.ndarray, counts: list[np.ndarray], met: list[np.ndarray]) -> np.ndarray:
    """(n_events, F) the event context of its taus."""
    tracks = np.rint(jets["QG_nTracks"])
    cand = (jmask & np.isin(tracks, detector.TAU_PRONGS) & (jets["pt"] > detector.TAU_PT_MIN_GEV)
            & (np.abs(jets["eta"]) < detector.TAU_ETA_MAX))
    first = np.argsort(~cand, axis=1, kind="stable")  # candidates first, in pT order
    cols = [cand.sum(1), jmask.sum(1), *counts, *met]
    cols += leading(jets, CANDIDATE_FEATURES, first, cand, CANDIDATES)
    cols += leading(jets, JET_FEATURES, np.broadcast_to(np.arange(jmask.shape[1]), jmask.shape), jmask, LEADING_JETS)
    return np.column_stack(cols)


def read_file(path: Path, tau_tok, jet_tok, through_tokens: bool) -> dict:
    """Per tau of the file: its context row, quantised latent, split and event."""
    with h5py.File(path) as f:
        taus, tmask = read_objects(f, "taus", tau_tok.features)
        jets, jmask = read_objects(f, "jets", set(jet_tok.features) | set(CANDIDATE_FEATURES) | set(JET_FEATURES))
        counts = [f[f"common/{o}/n"][:] for o in COUNTED]
        met = [f["common/met/pt"][:], f["common/met/phi"][:]]
    if through_tokens:
        jets = jets_through_tokens(jets, jmask, jet_tok)
    n_taus = tmask.sum(1)
    event = np.repeat(np.arange(len(tmask)), n_taus)
    rank = np.arange(len(event)) - np.repeat(np.cumsum(n_taus) - n_taus, n_taus)  # taus stand in pT order
    codes = tau_tok.encode({k: v[tmask] for k, v in taus.items()}, event)
    latent = tau_tok.quantised_latent(codes).numpy()
    x = np.column_stack([context(jets, jmask, counts, met)[event], rank, n_taus[event]])
    return {"x": x, "latent": latent, "split": split_of(path.name, event), "event": event}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/default", help="a run_all folder: its h5/ and tok/")
    p.add_argument("--jets", choices=("exact", "tokens"), default="exact")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    run = Path(args.run)
    try:
        tau_tok, jet_tok = load_tokenizer(run / "tok/taus.pt"), load_tokenizer(run / "tok/jets.pt")
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        die(f"{run / 'tok'}: no readable taus and jets tokenizers ({first_line(exc)})")
    files = sorted((run / "h5").glob("*.h5"))
    if not files:
        die(f"{run / 'h5'}: no step1 HDF5 files")
    parts = []
    for h5 in files:
        try:
            parts.append(read_file(h5, tau_tok, jet_tok, args.jets == "tokens"))
        except (OSError, KeyError, ValueError) as exc:
            die(f"{h5}: cannot read its taus and jets ({first_line(exc)})", EXIT_SOME_FAILED)
    data = {k: np.concatenate([d[k] for d in parts]) for k in ("x", "latent", "split")}
    data["event"] = np.concatenate([d["event"] + 10**9 * i for i, d in enumerate(parts)])  # unique per file
    train = data["split"] == SPLITS["train"]
    if train.sum() < 2:
        die(f"{run / 'h5'}: {train.sum()} train taus, too few to fit", EXIT_SOME_FAILED)
    mean, std = data["latent"][train].mean(0), data["latent"][train].std(0)
    used = std > 0  # a type's latent fills only some columns of the codebook dim
    z = (data["latent"][:, used] - mean[used]) / std[used]
    pred = np.column_stack([HistGradientBoostingRegressor(**GBDT, random_state=args.seed).fit(data["x"][train], z[train, d])
                            .predict(data["x"]) for d in range(z.shape[1])])
    print(f"jets {args.jets}: {train.sum()} train taus, {z.shape[1]} latent columns, {data['x'].shape[1]} context features")
    for split in ("val", "test"):
        sel = data["split"] == SPLITS[split]
        _, events = np.unique(data["event"][sel], return_inverse=True)
        stats = RegressionStats(1, "cpu")
        stats.add(torch.zeros(sel.sum(), dtype=torch.long), torch.from_numpy(pred[sel]), torch.from_numpy(z[sel]),
                  torch.ones(sel.sum(), z.shape[1], dtype=torch.float64), torch.from_numpy(events))
        g = stats.summary({"type_ids": {"taus": 0}})["per_type"]["taus"]
        lo, hi = g["context_gain_ci95"]
        print(f"{split}: context gain {g['context_gain']:.3f} [{lo:.3f}, {hi:.3f}] ({g['n']} taus in {g['n_events']} events)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
