"""Physics-sanity plots of generated samples, read straight from the PHYSLITE-like ROOT files.

    python plotting/plot_sample.py data/raw/*.root --out-dir runs/plots/sample

PNGs: m4l after a standard 4-lepton selection, the Z-candidate mll, the truth b-jet multiplicity,
the GN2 b-tag discriminant for b, c and light jets, object multiplicities per process, and
lepton isolation for prompt vs non-prompt leptons (truthType). Branch names come from
common/physlite.py, the Z mass, pairing and b-jet definition from common/physics.py. The
analysis functions are also what tests/test_generate.py asserts on.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import awkward as ak
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import physics, sample_checks  # noqa: E402
from common.physlite import (BRANCHES, MUON_QUALITY_MASK, SCALE, TREES, TRUTH_BRANCHES, first_present,  # noqa: E402
                             open_tree, read_generator_metadata, tree_keys)
from common.runtime import EXIT_OK, EXIT_USAGE, error_line  # noqa: E402
from common.schema import SEQUENCE_OBJECTS  # noqa: E402
from plotting.figures import plt, save_figure  # noqa: E402

OUT_DIR = "runs/plots/sample"
# the standard H->4l lepton selection (ATLAS-like): object cuts, then two same-flavour opposite-charge pairs
E_PT, E_ETA, MU_PT, MU_ETA = 7.0, 2.47, 5.0, 2.7
MU_LOOSE = 2  # muon quality: 0 Tight, 1 Medium, 2 Loose, 3 VeryLoose
LEAD_PTS = (20.0, 15.0, 10.0)
M12_WINDOW, M34_WINDOW = (50.0, 106.0), (12.0, 115.0)
TRUTH_B, TRUTH_C, TRUTH_LIGHT = 5, 4, 0  # HadronConeExclTruthLabelID
LEPTON_FIELDS = ("pt", "eta", "phi", "charge", "truthType", "ptvarcone30")


def load(path) -> dict:
    """The branches the plots need, in GeV, as {object: awkward record array}.

    Jets get the GN2 b-tag discriminant and physics.is_bjet; their BTagging entries are taken in
    jet order, which holds for step0 files (btaggingLink index = jet index)."""
    tree, name, f = open_tree(path, TREES)
    with f:
        keys, kind = tree_keys(tree), TREES[name]

        def branch(obj: str, feat: str) -> str:
            table = TRUTH_BRANCHES if feat in TRUTH_BRANCHES.get(obj, {}) else BRANCHES
            found = first_present(table[obj][feat], keys, kind)
            if found is None:
                raise KeyError(f"no {obj} {feat} branch ({table[obj][feat][0]})")
            return found

        wanted = {(o, v) for o in ("electrons", "muons") for v in LEPTON_FIELDS}
        wanted |= {("electrons", "LHLoose"), ("muons", "quality"), ("jets", "pt"), ("jets", "eta"),
                   ("jets", "HadronConeExclTruthLabelID"), ("tracks", "phi")}
        wanted |= {(o, "pt") for o in SEQUENCE_OBJECTS if o != "tracks"}  # tracks store no pt: counted by phi
        wanted |= {("jets", f"{physics.BJET_TAGGER}_{s}") for s in ("pb", "pc", "pu")}
        names = {w: branch(*w) for w in sorted(wanted)}
        arrays = tree.arrays(sorted(set(names.values())))
        process = read_generator_metadata(f).get("process", Path(path).stem)
    a = lambda obj, feat: arrays[names[(obj, feat)]]  # noqa: E731
    gev = lambda obj, feat: a(obj, feat) * SCALE["GeV"]  # noqa: E731

    def leptons(obj: str, flavour: int, loose) -> ak.Array:
        pt = gev(obj, "pt")
        return ak.zip({
            "pt": pt, "eta": a(obj, "eta"), "phi": a(obj, "phi"), "charge": a(obj, "charge"),
            "mass": ak.full_like(pt, physics.LEPTON_MASS[obj], dtype=np.float64),
            "flavour": ak.full_like(pt, flavour, dtype=np.int8),
            "prompt": a(obj, "truthType") % 2 == 0,  # MCTruthClassifier: 2/6 isolated (prompt) e/mu, 3/7 non-isolated
            "rel_iso": a(obj, "ptvarcone30") / a(obj, "pt"), "loose": loose})

    jet_pt, jet_eta = gev("jets", "pt"), a("jets", "eta")
    off, flat_pt = physics.flat(jet_pt)
    scores = [physics.flat(a("jets", f"{physics.BJET_TAGGER}_{s}"))[1] for s in ("pb", "pc", "pu")]
    discriminant = physics.btag_discriminant(*scores, physics.BJET_TAGGER)
    tagged = physics.is_bjet(flat_pt, physics.flat(jet_eta)[1], *scores)
    return {
        "path": str(path), "process": str(process),
        "electrons": leptons("electrons", 11, a("electrons", "LHLoose") == 1),
        "muons": leptons("muons", 13, (a("muons", "quality") & MUON_QUALITY_MASK) <= MU_LOOSE),
        "jets": ak.zip({"pt": jet_pt, "eta": jet_eta, "label": a("jets", "HadronConeExclTruthLabelID"),
                        "btag_d": physics.jagged(off, discriminant), "is_bjet": physics.jagged(off, tagged)}),
        "n": {o: ak.num(a(o, "phi" if o == "tracks" else "pt")) for o in SEQUENCE_OBJECTS},
    }


def p4(leptons: ak.Array) -> np.ndarray:
    """(E, px, py, pz) of a flat (not per-event) array of lepton records."""
    return physics.p4(*(ak.to_numpy(leptons[v]) for v in ("pt", "eta", "phi", "mass")))


def selected_leptons(s: dict) -> ak.Array:
    el, mu = s["electrons"], s["muons"]
    el = el[(el.pt > E_PT) & (abs(el.eta) < E_ETA) & el.loose]
    mu = mu[(mu.pt > MU_PT) & (abs(mu.eta) < MU_ETA) & mu.loose]
    leps = ak.concatenate([el, mu], axis=1)
    return leps[ak.argsort(leps.pt, axis=1, ascending=False)]


def best_per_event(values: np.ndarray, distance: np.ndarray, counts) -> np.ndarray:
    """Per event, the value of its candidate with the smallest finite distance (NaN when none)."""
    values = ak.unflatten(np.where(np.isfinite(distance), values, np.nan), counts)
    best = ak.firsts(values[ak.argmin(ak.unflatten(distance, counts), axis=1, keepdims=True)], axis=1)
    return ak.to_numpy(ak.fill_none(best, np.nan)).astype(float)


def z_candidate_mass(s: dict) -> np.ndarray:
    """Per event with a same-flavour opposite-charge pair: the pair mass closest to the Z mass."""
    pairs = ak.combinations(selected_leptons(s), 2, fields=["a", "b"])
    pairs = pairs[(pairs.a.flavour == pairs.b.flavour) & (pairs.a.charge * pairs.b.charge < 0)]
    flat = ak.flatten(pairs)
    m = physics.invariant_mass(p4(flat.a) + p4(flat.b))
    best = best_per_event(m, np.abs(m - physics.Z_MASS), ak.num(pairs))
    return best[np.isfinite(best)]


def four_lepton_mass(s: dict) -> np.ndarray:
    """m4l of events passing the standard selection: Z1 and Z2 from physics.z_pairing, Z1 in
    50-106 GeV, Z2 in 12-115 GeV, leading lepton pTs above 20/15/10 GeV; of several passing
    quadruplets, the one with Z1 closest to the Z mass."""
    fields = ("l0", "l1", "l2", "l3")
    quads = ak.combinations(selected_leptons(s), 4, fields=list(fields))  # pT-ordered within a quadruplet
    flat = ak.flatten(quads)
    p4s = np.stack([p4(flat[f]) for f in fields], axis=1)
    flavour, charge = (np.stack([ak.to_numpy(flat[f][v]) for f in fields], axis=1) for v in ("flavour", "charge"))
    mz1, mz2, _ = physics.z_pairing(p4s, flavour, charge)
    with np.errstate(invalid="ignore"):
        ok = ((mz1 > M12_WINDOW[0]) & (mz1 < M12_WINDOW[1]) & (mz2 > M34_WINDOW[0]) & (mz2 < M34_WINDOW[1])
              & np.all(np.stack([ak.to_numpy(flat[f].pt) for f in fields[:3]], 1) > LEAD_PTS, axis=1))
    m4l = physics.invariant_mass(p4s.sum(axis=1))
    best = best_per_event(m4l, np.where(ok, np.abs(mz1 - physics.Z_MASS), np.inf), ak.num(quads))
    return best[np.isfinite(best)]


def central_jets(s: dict) -> ak.Array:
    """Jets in the b-tagging acceptance of physics.is_bjet (pT and |eta|)."""
    j = s["jets"]
    return j[(j.pt > physics.BJET_PT_MIN) & (abs(j.eta) < physics.BJET_ETA_MAX)]


def n_truth_bjets(s: dict) -> np.ndarray:
    """Truth-labelled b-jets (HadronConeExclTruthLabelID 5) per event, in the b-tagging acceptance."""
    return ak.to_numpy(ak.sum(central_jets(s).label == TRUTH_B, axis=1))


def btag_discriminant(s: dict, label: int) -> np.ndarray:
    """The GN2 discriminant D of central jets with this truth label."""
    j = central_jets(s)
    return ak.to_numpy(ak.flatten(j.btag_d[j.label == label])).astype(float)


def tagged_fraction(samples: list[dict], label: int) -> float:
    """Fraction of central jets with this truth label that are b-jets (physics.is_bjet)."""
    tagged = [ak.to_numpy(ak.flatten(j.is_bjet[j.label == label])) for j in map(central_jets, samples)]
    tagged = np.concatenate(tagged)
    return float(tagged.mean()) if len(tagged) else float("nan")


def lepton_isolation(s: dict, prompt: bool) -> np.ndarray:
    """ptvarcone30 / pT of leptons above 10 GeV that are (non-)prompt by truthType."""
    leps = ak.concatenate([s["electrons"], s["muons"]], axis=1)
    leps = leps[(leps.pt > 10) & (leps.prompt == prompt)]
    return ak.to_numpy(ak.flatten(leps.rel_iso)).astype(float)


# ---------------------------------------------------------------------------------------------
def plot_all(samples: list[dict], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        written.append(save_figure(fig, out_dir / name))

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in samples:
        m = four_lepton_mass(s)
        if len(m):
            ax.hist(m, bins=np.arange(80, 400, 2.5), histtype="step", density=True, label=f"{s['process']} ({len(m)} ev)")
    ax.set(xlabel="m4l [GeV]", ylabel="normalised", title="m4l after the 4-lepton selection")
    ax.legend()
    save(fig, "m4l.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in samples:
        m = z_candidate_mass(s)
        if len(m):
            ax.hist(m, bins=np.arange(40, 140, 1.0), histtype="step", density=True, label=s["process"])
    ax.axvline(physics.Z_MASS, color="grey", ls=":")
    ax.set(xlabel="m(SFOS pair closest to mZ) [GeV]", ylabel="normalised", title="Z candidate mass")
    ax.legend()
    save(fig, "mll.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in samples:
        ax.hist(n_truth_bjets(s), bins=np.arange(-0.5, 6.5), histtype="step", density=True, label=s["process"])
    ax.set(xlabel=f"b-labelled jets (pT > {physics.BJET_PT_MIN:g} GeV, |eta| < {physics.BJET_ETA_MAX:g})",
           ylabel="fraction of events")
    ax.legend()
    save(fig, "n_bjets.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, name in ((TRUTH_B, "b"), (TRUTH_C, "c"), (TRUTH_LIGHT, "light")):
        d = np.concatenate([btag_discriminant(s, lab) for s in samples])
        if len(d):
            ax.hist(d, bins=np.linspace(-10, 10, 81), histtype="step", density=True,
                    label=f"{name} jets ({tagged_fraction(samples, lab):.1%} b-tagged)")
    ax.axvline(physics.BJET_CUT, color="grey", ls=":")
    ax.set(xlabel=f"{physics.BJET_TAGGER} discriminant D (b-jet: D > {physics.BJET_CUT:g})", ylabel="normalised",
           yscale="log")
    ax.legend()
    save(fig, "btag_discriminant.png")

    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    for ax, obj in zip(axes.flat, SEQUENCE_OBJECTS):
        for s in samples:
            n = ak.to_numpy(s["n"][obj])
            hi = max(int(np.percentile(n, 99)) + 2, 4)
            ax.hist(n, bins=np.arange(-0.5, hi + 0.5, max(1, hi // 40)), histtype="step", density=True, label=s["process"])
        ax.set(xlabel=f"{obj} per event")
    axes.flat[0].legend()
    save(fig, "multiplicities.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    prompt = np.concatenate([lepton_isolation(s, True) for s in samples])
    nonprompt = np.concatenate([lepton_isolation(s, False) for s in samples])
    bins = np.linspace(0, 1.0, 41)
    for vals, name in ((prompt, "prompt"), (nonprompt, "non-prompt")):
        if len(vals):
            ax.hist(np.clip(vals, 0, 0.999), bins=bins, histtype="step", density=True, label=f"{name} ({len(vals)})")
    ax.set(xlabel="ptvarcone30 / pT (e and mu, pT > 10 GeV)", ylabel="normalised", yscale="log")
    ax.legend()
    save(fig, "lepton_isolation.png")

    # the W Jacobian edge and the jet spectra, through the converter's own reader (common.sample_checks)
    obs = {s["process"]: sample_checks.observables(s["path"]) for s in samples}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for proc, o in obs.items():
        mt = o["mt_w"][np.isfinite(o["mt_w"])]
        if len(mt) > 50:
            a.hist(mt, bins=np.arange(0, 160, 4), histtype="step", density=True, label=f"{proc} ({len(mt)} ev)")
        b.hist(o["jet1_pt"][o["jet1_pt"] > 0], bins=np.geomspace(25, 1000, 40), histtype="step", density=True, label=proc)
    a.axvline(physics.W_MASS, color="grey", ls=":")
    a.set(xlabel="mT(lepton, MET) [GeV], events with one isolated lepton", ylabel="normalised")
    b.set(xlabel="leading jet pT [GeV]", ylabel="normalised", xscale="log", yscale="log")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    save(fig, "mt_w_and_jet_pt.png")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="PHYSLITE-like ROOT files written by step0_generate.py")
    ap.add_argument("--out-dir", type=Path, default=Path(OUT_DIR))
    args = ap.parse_args(argv)
    samples, errors = [], []
    for path in args.inputs:
        try:
            samples.append(load(path))
        except Exception as exc:  # one bad file does not stop the others
            line = error_line(path, f"{type(exc).__name__}: {exc}")
            print(line, file=sys.stderr)
            errors.append(line)
    if not samples:
        return EXIT_USAGE if not args.inputs else 1
    for path in plot_all(samples, args.out_dir):
        print(path)
    return 1 if errors else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
