"""The classification task of step4: which processes form which class, and how events weigh.

Classes: binary (signal vs background, label 1 = signal) or n classes from --classes, each a list of
process names or dataset ids. Weighting:
  events  every event weighs its generator weight (each process by its event count: the default);
  xsec    every event weighs generator weight x cross-section / sum of weights of its process
          (step1's HDF5 /metadata), so a class mixing processes is the physical mixture.
The metrics use these weights with their sign (common.classifier_metrics). The loss uses their
absolute values, scaled so every class weighs the same in the training set: a negative weight in a
cross-entropy rewards misclassifying that event without bound, so its sign is left to the
metrics, where the subtraction it stands for is physical.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common.h5io import read_metadata
from common.runtime import first_line

WEIGHTINGS = ("events", "xsec")


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def parse_classes(text: str) -> list[tuple[str, list[str]]]:
    """'ggF=hzz4l;VBF=vbfh4l;VH=whh4l,zhh4l' or 'hzz4l;zz4l;ttbar,dy' -> [(name, [process or dsid, ...])];
    an unnamed class is named by its processes joined with '+'. ValueError for a bad spelling."""
    classes = []
    for part in (p.strip() for p in text.split(";") if p.strip()):
        name, _, procs = part.rpartition("=")
        members = csv_list(procs)
        if not members:
            raise ValueError(f"class '{part}' names no process")
        classes.append((name.strip() or "+".join(members), members))
    if len(classes) < 2:
        raise ValueError(f"--classes '{text}': at least two classes, separated by ';'")
    names = [n for n, _ in classes]
    if len(set(names)) < len(names):
        raise ValueError(f"--classes '{text}': class names repeat")
    return classes


def resolve(names: list[str], totals: dict, role: str) -> list[str]:
    """Process names or dataset ids -> process names present in the data; unknown is an error."""
    out = []
    for name in names:
        hits = [p for p, t in totals.items() if p == name or str(t["dsid"]) == name]
        if not hits:
            present = ", ".join(f"{p} ({t['dsid']})" for p, t in sorted(totals.items()))
            raise ValueError(f"{role} '{name}' matches no events (present: {present})")
        out += hits
    return sorted(set(out))


@dataclass
class Task:
    names: list[str]  # class names; the index is the label
    members: list[list[str]]  # the processes of each class
    test_background: list[str] = field(default_factory=list)  # binary only: tested, never trained on
    weighting: str = "events"
    scale: dict = field(default_factory=dict)  # process -> factor on the generator weight (1 under events)
    norm: list = field(default_factory=list)  # per class: balances the classes in the loss
    binary: bool = True  # signal vs background (label 1: signal), else n classes from --classes

    @property
    def signal(self) -> list[str]:
        return self.members[1]

    @property
    def background(self) -> list[str]:
        return self.members[0]

    @property
    def labelled(self) -> list[str]:
        return [p for m in self.members for p in m]

    def labels(self, process: np.ndarray) -> np.ndarray:
        """Class index of every event; -1 for a process of no class (a test-only background)."""
        y = np.full(len(process), -1, np.int64)
        for k, procs in enumerate(self.members):
            y[np.isin(process, procs)] = k
        return y

    def event_weights(self, process: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """The signed physical weight of every event under this weighting (what the metrics use)."""
        factor = np.ones(len(process))
        for p, s in self.scale.items():
            factor[process == p] = s
        return weight.astype(np.float64) * factor

    def train_weights(self, process: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Labels and loss weights: |physical weight| scaled so every class weighs the same."""
        y = self.labels(process)
        return y, np.where(y >= 0, np.abs(self.event_weights(process, weight)) * np.asarray(self.norm)[y], 0.0)

    def balance(self, train_totals: dict) -> None:
        """Per-class loss normalisation from the training split's per-process summed |weights|:
        every class gets the same total, and the mean loss weight is about 1."""
        n = sum(v["events"] for p, v in train_totals.items() if p in self.labelled)
        sums = [sum(self.scale.get(p, 1.0) * train_totals.get(p, {}).get("sum_abs_weights", 0.0) for p in procs)
                for procs in self.members]
        self.norm = [n / len(self.members) / s for s in sums]

    def describe(self) -> dict:
        """What metrics.json records of the task."""
        out = {"kind": "binary" if self.binary else "multiclass", "weighting": self.weighting,
               "weighting_definition": WEIGHTING_TEXT[self.weighting], "loss_weights": LOSS_TEXT,
               "class_weight_norm": dict(zip(self.names, self.norm))}
        if self.binary:
            out.update(signal=self.signal, background=self.background, test_background=self.test_background)
        else:
            out["classes"] = dict(zip(self.names, self.members))
        if self.weighting == "xsec":
            out["process_scale"] = self.scale
        return out


WEIGHTING_TEXT = {
    "events": "each event weighs its generator weight (every process by its number of events)",
    "xsec": "each event weighs generator weight x cross-section [pb] / sum of weights of its process "
            "(step1 /metadata): the physical mixture; metrics with the signed weights",
}
LOSS_TEXT = "|event weight| (under the weighting) x a per-class factor that makes the classes weigh the same"


def binary_task(signal: list[str], background: list[str], test_background: list[str]) -> Task:
    overlap = sorted(set(signal) & set(background))
    if overlap:
        raise ValueError(f"process(es) {', '.join(overlap)} are both signal and background")
    return Task(["background", "signal"], [background, signal], test_background)


def multiclass_task(classes: list[tuple[str, list[str]]], totals: dict) -> Task:
    members = [resolve(procs, totals, f"class {name}") for name, procs in classes]
    seen: dict[str, str] = {}
    for (name, _), procs in zip(classes, members):
        for p in procs:
            if p in seen:
                raise ValueError(f"process {p} is in two classes ({seen[p]} and {name})")
            seen[p] = name
    return Task([n for n, _ in classes], members, binary=False)


def xsec_scale(h5_files: dict[str, str], processes: list[str]) -> dict[str, float]:
    """process -> cross-section [pb] / sum of weights, from the /metadata of the step1 HDF5 files
    (a process spread over several files: their sums of weights add up). ValueError names the
    first file without a usable cross-section or sum of weights."""
    xs, sumw = {}, {}
    for path in sorted(set(h5_files.values())):
        try:
            meta = read_metadata(path)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: {first_line(exc)}") from exc
        proc = meta.get("process")
        if proc not in processes:
            continue
        x, s = meta.get("cross_section_pb"), meta.get("sum_weights")
        if x is None or not np.isfinite(x) or x <= 0:
            raise ValueError(f"{path}: no cross-section in /metadata (cross_section_pb = {x}), needed by --weighting xsec")
        if s is None or not np.isfinite(s) or s <= 0:
            raise ValueError(f"{path}: no positive sum of weights in /metadata (sum_weights = {s}), "
                             "needed by --weighting xsec")
        xs[proc], sumw[proc] = x, sumw.get(proc, 0.0) + s
    missing = sorted(set(processes) - set(xs))
    if missing:
        raise ValueError(f"{', '.join(sorted(set(h5_files.values())))}: no HDF5 /metadata of process(es) "
                         f"{', '.join(missing)}, needed by --weighting xsec")
    return {p: xs[p] / sumw[p] for p in xs}
