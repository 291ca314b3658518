"""Physics-sanity plots of generated samples, read straight from the PHYSLITE-like ROOT files.

    python plotting/plot_sample.py data/raw/*.root --out-dir runs/plots/sample

PNGs: m4l after a standard 4-lepton selection, the Z-candidate mll, b-jet multiplicity,
GN2 pb for b vs light jets, object multiplicities per process, and lepton isolation for
prompt vs non-prompt leptons (truthType). The analysis functions are also what
tests/test_generate.py asserts on.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import awkward as ak
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.runtime import EXIT_OK, EXIT_USAGE, error_line  # noqa: E402
from plotting.figures import plt, save_figure  # noqa: E402

OUT_DIR = "runs/plots/sample"
MZ = 91.1876
# the standard H->4l lepton selection (ATLAS-like): object cuts, then two same-flavour opposite-charge pairs
E_PT, E_ETA, MU_PT, MU_ETA = 7.0, 2.47, 5.0, 2.7
LEAD_PTS = (20.0, 15.0, 10.0)
M12_WINDOW, M34_WINDOW = (50.0, 106.0), (12.0, 115.0)
B_TAG_PT, B_TAG_ETA, GN2_B_CUT = 20.0, 2.5, 0.5
CONTAINERS = {"electrons": "AnalysisElectronsAuxDyn", "muons": "AnalysisMuonsAuxDyn", "taus": "AnalysisTauJetsAuxDyn",
              "photons": "AnalysisPhotonsAuxDyn", "jets": "AnalysisJetsAuxDyn", "tracks": "InDetTrackParticlesAuxDyn"}


def load(path) -> dict:
    """The branches the plots need, in GeV, as {object: awkward record array}."""
    import uproot

    with uproot.open(path) as f:
        t = f["CollectionTree"]
        e, mu, j = "AnalysisElectronsAuxDyn.", "AnalysisMuonsAuxDyn.", "AnalysisJetsAuxDyn."
        names = [e + x for x in ("pt", "eta", "phi", "charge", "truthType", "DFCommonElectronsLHLoose",
                                 "ptvarcone30_Nonprompt_All_MaxWeightTTVALooseCone_pt1000", "topoetcone20")]
        names += [mu + x for x in ("pt", "eta", "phi", "charge", "truthType", "quality", "ptvarcone30", "topoetcone20")]
        names += [j + x for x in ("pt", "eta", "HadronConeExclTruthLabelID")]
        names += ["BTagging_AntiKt4EMPFlowAuxDyn.GN2v01_pb", "AnalysisTauJetsAuxDyn.pt", "AnalysisPhotonsAuxDyn.pt",
                  "InDetTrackParticlesAuxDyn.phi", "EventInfoAuxDyn.mcEventWeights"]
        a = t.arrays(names)
        process = f["GeneratorMetaData"]["process"].array(library="np")[0] if "GeneratorMetaData" in f else Path(path).stem
    gev = lambda x: a[x] * 1e-3  # noqa: E731
    lep = lambda p, flavour, iso, loose: ak.zip({  # noqa: E731
        "pt": gev(p + "pt"), "eta": a[p + "eta"], "phi": a[p + "phi"], "charge": a[p + "charge"],
        "flavour": ak.full_like(a[p + "pt"], flavour, dtype=np.int8), "prompt": a[p + "truthType"] % 2 == 0,
        "rel_iso": a[p + iso] / a[p + "pt"], "rel_calo_iso": a[p + "topoetcone20"] / a[p + "pt"], "loose": loose})
    return {
        "process": str(process),
        "electrons": lep(e, 11, "ptvarcone30_Nonprompt_All_MaxWeightTTVALooseCone_pt1000",
                         a[e + "DFCommonElectronsLHLoose"] == 1),
        "muons": lep(mu, 13, "ptvarcone30", (a[mu + "quality"] & 3) <= 2),
        "jets": ak.zip({"pt": gev(j + "pt"), "eta": a[j + "eta"], "label": a[j + "HadronConeExclTruthLabelID"],
                        "gn2_pb": a["BTagging_AntiKt4EMPFlowAuxDyn.GN2v01_pb"]}),
        "n": {"electrons": ak.num(a[e + "pt"]), "muons": ak.num(a[mu + "pt"]), "taus": ak.num(a["AnalysisTauJetsAuxDyn.pt"]),
              "photons": ak.num(a["AnalysisPhotonsAuxDyn.pt"]), "jets": ak.num(a[j + "pt"]),
              "tracks": ak.num(a["InDetTrackParticlesAuxDyn.phi"])},
    }


def _p4(lep):
    return (lep.pt * np.cos(lep.phi), lep.pt * np.sin(lep.phi), lep.pt * np.sinh(lep.eta), lep.pt * np.cosh(lep.eta))


def _mass(*leps):
    px, py, pz, e = (sum(c) for c in zip(*(_p4(l) for l in leps)))
    return np.sqrt(np.maximum(e ** 2 - px ** 2 - py ** 2 - pz ** 2, 0))


def selected_leptons(s: dict) -> ak.Array:
    el, mu = s["electrons"], s["muons"]
    el = el[(el.pt > E_PT) & (abs(el.eta) < E_ETA) & el.loose]
    mu = mu[(mu.pt > MU_PT) & (abs(mu.eta) < MU_ETA) & mu.loose]
    leps = ak.concatenate([el, mu], axis=1)
    return leps[ak.argsort(leps.pt, axis=1, ascending=False)]


def z_candidate_mass(s: dict) -> np.ndarray:
    """Per event with a same-flavour opposite-charge pair: the pair mass closest to mZ."""
    pairs = ak.combinations(selected_leptons(s), 2, fields=["a", "b"])
    pairs = pairs[(pairs.a.flavour == pairs.b.flavour) & (pairs.a.charge * pairs.b.charge < 0)]
    m = _mass(pairs.a, pairs.b)
    best = ak.firsts(m[ak.argmin(abs(m - MZ), axis=1, keepdims=True)], axis=1)
    return ak.to_numpy(ak.drop_none(best)).astype(float)


def four_lepton_mass(s: dict) -> np.ndarray:
    """m4l of events passing the standard selection: two SFOS pairs, Z1 (closest to mZ) in
    50-106 GeV, Z2 in 12-115 GeV, leading lepton pTs above 20/15/10 GeV."""
    leps = selected_leptons(s)
    quads = ak.combinations(leps, 4, fields=["l0", "l1", "l2", "l3"])  # pT-ordered within a quadruplet
    best_m, best_dz = None, None
    for (a, b), (c, d) in ((("l0", "l1"), ("l2", "l3")), (("l0", "l2"), ("l1", "l3")), (("l0", "l3"), ("l1", "l2"))):
        for z1, z2 in (((a, b), (c, d)), ((c, d), (a, b))):
            p1, p2 = (quads[z1[0]], quads[z1[1]]), (quads[z2[0]], quads[z2[1]])
            sfos = lambda p: (p[0].flavour == p[1].flavour) & (p[0].charge * p[1].charge < 0)  # noqa: E731
            m12, m34 = _mass(*p1), _mass(*p2)
            ok = (sfos(p1) & sfos(p2) & (m12 > M12_WINDOW[0]) & (m12 < M12_WINDOW[1])
                  & (m34 > M34_WINDOW[0]) & (m34 < M34_WINDOW[1]) & (abs(m12 - MZ) <= abs(m34 - MZ)))
            ok = ok & (quads.l0.pt > LEAD_PTS[0]) & (quads.l1.pt > LEAD_PTS[1]) & (quads.l2.pt > LEAD_PTS[2])
            dz = ak.where(ok, abs(m12 - MZ), np.inf)
            m4 = _mass(quads.l0, quads.l1, quads.l2, quads.l3)
            if best_m is None:
                best_m, best_dz = ak.where(ok, m4, np.nan), dz
            else:
                better = dz < best_dz
                best_m, best_dz = ak.where(better, m4, best_m), ak.where(better, dz, best_dz)
    if best_m is None:
        return np.array([])
    pick = ak.firsts(best_m[ak.argmin(best_dz, axis=1, keepdims=True)], axis=1)
    m = ak.to_numpy(ak.fill_none(pick, np.nan)).astype(float)
    return m[np.isfinite(m)]


def central_jets(s: dict) -> ak.Array:
    j = s["jets"]
    return j[(j.pt > B_TAG_PT) & (abs(j.eta) < B_TAG_ETA)]


def n_bjets(s: dict) -> np.ndarray:
    """Truth-labelled b-jets (HadronConeExclTruthLabelID 5) per event, pT > 20 GeV, |eta| < 2.5."""
    return ak.to_numpy(ak.sum(central_jets(s).label == 5, axis=1))


def gn2_pb(s: dict, label: int) -> np.ndarray:
    j = central_jets(s)
    return ak.to_numpy(ak.flatten(j.gn2_pb[j.label == label])).astype(float)


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
    ax.axvline(MZ, color="grey", ls=":")
    ax.set(xlabel="m(SFOS pair closest to mZ) [GeV]", ylabel="normalised", title="Z candidate mass")
    ax.legend()
    save(fig, "mll.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in samples:
        ax.hist(n_bjets(s), bins=np.arange(-0.5, 6.5), histtype="step", density=True, label=s["process"])
    ax.set(xlabel="b-labelled jets (pT > 20 GeV, |eta| < 2.5)", ylabel="fraction of events")
    ax.legend()
    save(fig, "n_bjets.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    pooled = {lab: np.concatenate([gn2_pb(s, lab) for s in samples]) for lab in (5, 4, 0)}
    for lab, name in ((5, "b"), (4, "c"), (0, "light")):
        if len(pooled[lab]):
            ax.hist(pooled[lab], bins=np.linspace(0, 1, 41), histtype="step", density=True, label=f"{name} jets")
    ax.set(xlabel="GN2 pb", ylabel="normalised", yscale="log")
    ax.legend()
    save(fig, "gn2_pb.png")

    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    for ax, obj in zip(axes.flat, CONTAINERS):
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
