"""The one definition of what an event holds: objects, their features, kinds, units, type ids.

Every step reads this module: step1 writes exactly these HDF5 datasets, step2 builds one
tokenizer per object from the features flagged `tokenize`, the sequence builder takes its
type ids and order from here, and the plots label axes with the units given here.

HDF5 layout (format_version 1; the full contract, /metadata included, is docs/DESIGN.md):
`/<group>/<object>/<feature>` (dataset_path) where group is `common`, `atlas` or `cms`.
Per-object datasets are (n_events, max_objects), pT-sorted, zero padded, with
`common/<object>/mask` (bool) and `common/<object>/n` (int32). Per-event objects (met, event)
are (n_events,). `/metadata` holds attributes only (METADATA_KEYS and more).

Jet constituents (JET_CONSTITUENTS, not a sequence object): `dataset_path("jet_constituents", f)`, shape
(n_events, max_jets, MAX_CONSTITUENTS) with max_jets the file's jets max_objects; slot [e, k, :] belongs to
the k-th stored jet of row e (common/jets/*), constituents pT-descending, zero padded;
`common/jet_constituents/mask` (bool, same shape) and `common/jet_constituents/n` (int16, (n_events, max_jets)).
/metadata `jet_constituents` (JSON) records where they come from: {"method": one of CONSTITUENT_METHODS,
"max_constituents": 50, "delta_r": 0.4 (delta_r only), "links_total", "links_valid", "valid_fraction" (links only)}
(docs/DESIGN.md section 2).

`Feature.group` is the HDF5 group (common / atlas / cms); `Feature.token_group` is the feature group
of the hierarchical tokens (kinematics | id | isolation | substructure | btag | impact | quality).
"""
from __future__ import annotations

from dataclasses import dataclass, field

FORMAT_VERSION = 1
MISSING_INT = -1  # fill of an absent integer feature (flags, categories); floats use NaN

# ---------------------------------------------------------------------------------------
# Feature kinds: they decide the tokenizer's preprocessing and loss.
#   continuous : float; `transform` is "quantile" (-> normal), "log_standard" or "standard"
#   angle      : phi; encoded as (cos, sin), decoded with atan2
#   score      : one member of a bounded triplet (`score_group`) that sums to 1
#                (log-ratios in, softmax out)
#   flag       : 0/1; BCE loss
#   category   : small set of integer values (`categories`); cross-entropy loss
#   id         : bookkeeping integer (event number, ...), never tokenized
# ---------------------------------------------------------------------------------------
TRANSFORMS = ("quantile", "log_standard", "standard")


@dataclass(frozen=True)
class Feature:
    name: str
    group: str  # "common", "atlas" or "cms"
    kind: str
    unit: str = ""
    tokenize: bool = False  # an input of the object's tokenizer
    transform: str = "quantile"  # continuous only
    score_group: str = ""  # score only: the triplet it belongs to
    categories: tuple[int, ...] = ()  # category only: the legal values
    optional: bool = True  # non-kinematic: filled with NaN (MISSING_INT for integers) and listed in missing_features when absent
    doc: str = ""
    token_group: str = "kinematics"  # the feature group (TOKEN_GROUPS) whose sub-token carries it in granularity "group"

    @property
    def dtype(self) -> str:
        if self.kind in ("flag", "category"):
            return "int8" if max(map(abs, self.categories or (1,))) < 127 else "int16"
        if self.kind == "id":
            return "int64"
        return "float32"


@dataclass(frozen=True)
class ObjectType:
    name: str
    type_id: int  # token_type_ids value in the event sequence
    per_event: bool  # True: one value per event (met, event); False: a padded list
    features: tuple[Feature, ...] = field(default_factory=tuple)

    def feature(self, name: str, group: str | None = None) -> Feature:
        for f in self.features:
            if f.name == name and (group is None or f.group == group):
                return f
        raise KeyError(f"{self.name} has no feature {name!r}")

    @property
    def token_features(self) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.tokenize)

    def score_groups(self) -> dict[str, tuple[Feature, ...]]:
        groups: dict[str, list[Feature]] = {}
        for f in self.features:
            if f.kind == "score":
                groups.setdefault(f.score_group, []).append(f)
        return {k: tuple(v) for k, v in groups.items()}


# Feature groups (sub-tokens): with step2 `--granularity group` each (object, group) gets a tokenizer of
# its own and an object is one position holding one sub-token per group (docs/DESIGN.md, section 4).
TOKEN_GROUPS = ("kinematics", "id", "isolation", "substructure", "btag", "impact", "quality")


def _kin(with_charge: bool = False, pt_transform: str = "quantile") -> tuple[Feature, ...]:
    kin = (
        Feature("pt", "common", "continuous", "GeV", True, transform=pt_transform, optional=False,
                doc="transverse momentum"),
        Feature("eta", "common", "continuous", "", True, transform="standard", optional=False, doc="pseudorapidity"),
        Feature("phi", "common", "angle", "rad", True, optional=False, doc="azimuth"),
    )
    if with_charge:
        kin += (Feature("charge", "common", "category", "e", True, categories=(-1, 1), optional=False),)
    return kin


def _iso(tokenize: bool = True) -> Feature:
    return Feature("trk_iso03", "common", "continuous", "", tokenize, token_group="isolation",
                   doc="sum pT of tracks (dR<0.3, pT>0.5 GeV, |z0 sin theta|<3 mm) / object pT")


def _flag(name: str, group: str = "atlas", tokenize: bool = False, doc: str = "", token_group: str = "id") -> Feature:
    return Feature(name, group, "flag", "", tokenize, categories=(0, 1), doc=doc, token_group=token_group)


def _cont(name: str, group: str = "atlas", unit: str = "", tokenize: bool = False,
          transform: str = "quantile", doc: str = "", token_group: str = "isolation") -> Feature:
    return Feature(name, group, "continuous", unit, tokenize, transform=transform, doc=doc, token_group=token_group)


def _score(name: str, triplet: str, group: str = "atlas", tokenize: bool = True) -> Feature:
    return Feature(name, group, "score", "", tokenize, score_group=triplet, token_group="btag")


ELECTRONS = ObjectType("electrons", 4, False, _kin(True) + (
    _iso(),
    _flag("LHLoose", tokenize=True), _flag("LHMedium", tokenize=True), _flag("LHTight", tokenize=True),
    _cont("topoetcone20", unit="GeV"), _cont("ptvarcone30", unit="GeV"),
    _cont("mass", unit="GeV", doc="electron mass as stored by the reconstruction"),
    # CMS NanoAOD
    Feature("cutBased", "cms", "category", "", categories=(0, 1, 2, 3, 4), doc="0 fail .. 4 tight"),
    _cont("pfRelIso03_all", "cms"), _flag("mvaIso_WP90", "cms"),
))

MUONS = ObjectType("muons", 5, False, _kin(True) + (
    _iso(),
    Feature("quality", "atlas", "category", "", True, categories=(0, 1, 2, 3), token_group="id",
            doc="0 Tight, 1 Medium, 2 Loose, 3 VeryLoose (decoded from the packed quality bits)"),
    Feature("muonType", "atlas", "category", "", True, categories=(0, 1, 2, 3, 4), token_group="id",
            doc="0 Combined, 1 MuonStandAlone, 2 SegmentTagged, 3 CaloTagged, 4 SiliconAssociatedForward"),
    _flag("passIDCuts"),
    _cont("topoetcone20", unit="GeV"), _cont("ptvarcone30", unit="GeV"),
    # CMS NanoAOD
    _flag("looseId", "cms"), _flag("mediumId", "cms"), _flag("tightId", "cms"),
    _cont("pfRelIso04_all", "cms"),
))

TAUS = ObjectType("taus", 11, False, _kin(True) + (
    _flag("is_1prong", "common", tokenize=True, doc="one charged track"),
    Feature("NNDecayMode", "atlas", "category", "", True, categories=(0, 1, 2, 3, 4, 5),
            doc="0 1p0n, 1 1p1n, 2 1pXn, 3 3p0n, 4 3pXn, 5 other", token_group="id"),
    _cont("RNNJetScore", tokenize=True, doc="tau-vs-jet ID score in [0,1]", token_group="id"),
    _cont("RNNEleScore", tokenize=True, doc="tau-vs-electron ID score in [0,1]", token_group="id"),
    # CMS NanoAOD
    Feature("decayMode", "cms", "category", "", categories=(0, 1, 2, 10, 11)),
    _cont("rawDeepTau2018v2p5VSjet", "cms"),
))

PHOTONS = ObjectType("photons", 8, False, _kin(False) + (
    _iso(),
    _flag("isLoose", tokenize=True), _flag("isTight", tokenize=True),
    Feature("author", "atlas", "category", "", categories=(0, 1, 2, 4, 8, 16, 32, 64, 128),
            doc="egamma author bit (4 photon, 8 ambiguous, 16 converted ...)"),
    _cont("topoetcone20", unit="GeV"), _cont("topoetcone40", unit="GeV"), _cont("ptcone20", unit="GeV"),
    # CMS NanoAOD
    Feature("cutBased", "cms", "category", "", categories=(0, 1, 2, 3)),
    _cont("pfRelIso03_all", "cms"),
))

JETS = ObjectType("jets", 6, False, _kin(False) + (
    Feature("mass", "common", "continuous", "GeV", True, optional=False),
    Feature("n_trk", "common", "continuous", "", True, transform="log_standard", token_group="substructure",
            doc="number of tracks with pT > 500 MeV"),
    _score("DL1d_pb", "DL1d"), _score("DL1d_pc", "DL1d"), _score("DL1d_pu", "DL1d"),
    _score("GN2_pb", "GN2"), _score("GN2_pc", "GN2"), _score("GN2_pu", "GN2"),
    _cont("QG_nTracks", tokenize=True, transform="log_standard", token_group="substructure"),
    _cont("QG_tracksWidth", tokenize=True, token_group="substructure"),
    _cont("QG_tracksC1", tokenize=True, token_group="substructure"),
    # CMS NanoAOD
    _cont("btagDeepFlavB", "cms"), _cont("btagDeepFlavCvL", "cms"), _cont("qgl", "cms"),
    Feature("jetId", "cms", "category", "", categories=(0, 1, 2, 3, 4, 5, 6, 7)),
    Feature("hadronFlavour", "cms", "category", "", categories=(0, 4, 5)),
))

# Track hit summaries (xAOD::TrackParticle summary values, PHYSLITE names): optional; the pixel, SCT and
# innermost-layer hit counts are tokenized, the rest are stored only.
HIT_SUMMARIES = tuple(
    _cont(name, tokenize=name in ("numberOfPixelHits", "numberOfSCTHits", "numberOfInnermostPixelLayerHits"),
          transform="standard", token_group="quality", doc=doc)
    for name, doc in (
        ("numberOfPixelHits", "pixel hits"), ("numberOfSCTHits", "SCT strip hits (one per side of a module)"),
        ("numberOfTRTHits", "TRT straw hits (0 beyond |eta| 2.0)"),
        ("numberOfPixelHoles", "pixel layers crossed without a hit"), ("numberOfSCTHoles", "SCT holes"),
        ("numberOfPixelSharedHits", "pixel hits shared with another track"),
        ("numberOfSCTSharedHits", "SCT hits shared with another track"),
        ("numberOfInnermostPixelLayerHits", "hits on the innermost pixel layer (IBL in Run 2 and 3)"),
    ))

# tracks: pT on log1p, not quantiles. 92% of the tracks lie below 10 GeV, so a quantile table gives the bulk the
# codes and the 10-30 GeV tracks came back at 6-8% resolution; log1p spends them evenly in relative pT.
TRACKS = ObjectType("tracks", 9, False, _kin(False, pt_transform="log_standard") + (
    Feature("d0", "common", "continuous", "mm", True, optional=False, doc="transverse impact parameter",
            token_group="impact"),
    Feature("z0", "common", "continuous", "mm", True, optional=False, token_group="impact",
            doc="longitudinal impact parameter w.r.t. the primary vertex"),
    _cont("qOverP", unit="1/GeV", tokenize=True, token_group="kinematics"),
    _cont("chiSquared", tokenize=True, token_group="quality"),
    _cont("nDoF", tokenize=True, transform="standard", token_group="quality",
          doc="standard only: a log transform hurts its reconstruction"),
) + HIT_SUMMARIES)

MET = ObjectType("met", 7, True, (
    Feature("pt", "common", "continuous", "GeV", True, optional=False),
    Feature("phi", "common", "angle", "rad", True, optional=False),
    Feature("sumet", "common", "continuous", "GeV", True, optional=False),
))

EVENT = ObjectType("event", 10, True, (
    Feature("pvx", "common", "continuous", "mm", optional=False),
    Feature("pvy", "common", "continuous", "mm", optional=False),
    Feature("pvz", "common", "continuous", "mm", optional=False),
    Feature("mu", "common", "continuous", "", optional=False, doc="average interactions per crossing"),
    Feature("experiment_id", "common", "category", "", categories=(0, 1), optional=False, doc="0 ATLAS, 1 CMS"),
    Feature("is_simulation", "common", "flag", "", categories=(0, 1), optional=False),
    Feature("weight", "common", "continuous", "", optional=False, doc="nominal generator weight"),
    Feature("event_number", "atlas", "id"), Feature("run_number", "atlas", "id"),
    Feature("mcChannelNumber", "atlas", "id"),
    Feature("event", "cms", "id"), Feature("run", "cms", "id"), Feature("luminosityBlock", "cms", "id"),
))

# Constituents of each stored jet: tracks (ATLAS ghost links or ΔR) or PF candidates (CMS PFNano).
MAX_CONSTITUENTS = 50  # per jet, the leading ones in pT
CONSTITUENT_METHODS = ("ghost_track_links", "pfnano_association", "delta_r")
CONSTITUENT_DELTA_R = 0.4  # the delta_r method: a track goes to the nearest jet axis within this
JET_CONSTITUENTS = ObjectType("jet_constituents", 12, False, _kin(False) + (
    Feature("charge", "common", "category", "e", True, categories=(-1, 0, 1), doc="0: a neutral PF candidate"),
    Feature("d0", "common", "continuous", "mm", True, doc="transverse impact parameter; NaN for a neutral candidate",
            token_group="impact"),
    Feature("z0", "common", "continuous", "mm", True, token_group="impact",
            doc="longitudinal impact parameter w.r.t. the primary vertex; NaN for a neutral candidate"),
) + HIT_SUMMARIES)

# Sequence order (docs/DESIGN.md): [CLS] [EVENT] e.. [SEP] mu.. [SEP] tau.. [SEP] gamma.. [SEP] jet.. [SEP] track.. [SEP] [MET]
OBJECTS: dict[str, ObjectType] = {o.name: o for o in (ELECTRONS, MUONS, TAUS, PHOTONS, JETS, TRACKS, MET, EVENT)}
SEQUENCE_OBJECTS = ("electrons", "muons", "taus", "photons", "jets", "tracks")  # SEP after each
TOKENIZED_OBJECTS = SEQUENCE_OBJECTS + ("met",)
LIST_OBJECTS = tuple(o.name for o in OBJECTS.values() if not o.per_event)

# Special token ids and type ids (docs/DESIGN.md, the token vocabulary).
PAD, CLS, SEP, MASK = 0, 1, 2, 3
N_SPECIAL = 4
SPECIAL_TYPE_ID = {"PAD": 0, "CLS": 1, "SEP": 2, "MASK": 3}
TYPE_IDS = {**SPECIAL_TYPE_ID, **{o.name: o.type_id for o in OBJECTS.values()}}

EXPERIMENT_ID = {"atlas": 0, "cms": 1}

METADATA_KEYS = (
    "experiment", "format_version", "input_file", "n_events", "git_hash", "pt_cuts", "max_objects",
    "common_iso_cone", "common_iso_pt_floor_gev", "common_iso_z0sintheta_cut_mm", "process", "dsid",
    "cross_section_pb", "sum_weights", "missing_features", "met_definition", "input_tree", "jet_constituents",
)

# trk_iso03 definition (recorded in /metadata), shared by the converter and the detector simulation.
ISO_CONE = 0.3
ISO_PT_FLOOR_GEV = 0.5
ISO_Z0SINTHETA_CUT_MM = 3.0


def token_groups(obj: str, features: tuple[Feature, ...] | None = None) -> dict[str, tuple[Feature, ...]]:
    """{group: its tokenized features} of an object, groups in TOKEN_GROUPS order, empty groups left out."""
    feats = OBJECTS[obj].token_features if features is None else features
    return {g: tuple(f for f in feats if f.token_group == g) for g in TOKEN_GROUPS
            if any(f.token_group == g for f in feats)}


def features_for(obj: str, experiment: str) -> tuple[Feature, ...]:
    """The features an HDF5 file of this experiment holds for `obj` (an object or jet_constituents):
    common + its own group."""
    types = {**OBJECTS, JET_CONSTITUENTS.name: JET_CONSTITUENTS}
    return tuple(f for f in types[obj].features if f.group in ("common", experiment))


def dataset_path(obj: str, feature: Feature) -> str:
    """The HDF5 dataset of one feature of an object, e.g. 'atlas/jets/GN2_pb'."""
    return f"{feature.group}/{obj}/{feature.name}"
