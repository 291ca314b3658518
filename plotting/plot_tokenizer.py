"""Tokenizer diagnostics, per object type, from a step2 fit directory (<obj>.json + <obj>.eval.npz):

  original vs reconstructed histograms, residuals, a 2D correlation (pt), binned relative
  resolution vs truth pT, used codes per level, sorted code frequency, dead codes; and, from
  closure.json + closure.npz, the decoded-physics closure (m4l, mll, mjj, Delta R, MET).

  python plotting/plot_tokenizer.py runs/tok [--objects jets,electrons]   -> runs/tok/plots/<obj>/*.png
                                                                             runs/tok/plots/closure/*.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap, LogNorm

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from plotting.figures import plt, save_figure  # noqa: E402  (sets the headless backend first)
from common.decoded_closure import QUANTITIES  # noqa: E402


def load(tok_dir: Path, obj: str):
    side = json.loads((tok_dir / f"{obj}.json").read_text())
    with np.load(tok_dir / f"{obj}.eval.npz", allow_pickle=False) as z:
        orig = {k[5:]: z[k] for k in z.files if k.startswith("orig/")}
        reco = {k[5:]: z[k] for k in z.files if k.startswith("reco/")}
        codes = z["codes"]
    return side, orig, reco, codes


def _grid(n: int):
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat


def _range(x):
    lo, hi = np.quantile(x, [0.005, 0.995])
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def plot_histograms(orig, reco, side, out: Path) -> None:
    names = [n for n in orig if n != "type"]
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names):
        o, r = orig[name].astype(float), reco[name].astype(float)
        kind = side["quality"]["features"].get(name, {}).get("kind", "")
        if kind in ("flag", "category"):
            vals = np.union1d(np.unique(o), np.unique(r))
            w = 0.4
            ax.bar(np.arange(len(vals)) - w / 2, [(o == v).mean() for v in vals], w, label="original")
            ax.bar(np.arange(len(vals)) + w / 2, [(r == v).mean() for v in vals], w, label="reconstructed")
            ax.set_xticks(np.arange(len(vals)), [f"{v:g}" for v in vals])
            ax.set_title(f"{name}  match {side['quality']['features'][name]['exact_match']:.4f}", fontsize=9)
        else:
            bins = np.linspace(*_range(o), 60)
            ax.hist(o, bins, histtype="step", label="original")
            ax.hist(r, bins, histtype="step", label="reconstructed")
            ax.set_title(name, fontsize=9)
            if name.endswith("pt") or name.endswith("sumet"):
                ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"{side['object']}: original vs reconstructed (held-out)")
    save_figure(fig, out / "reco_vs_original.png", dpi=90)


def plot_residuals(orig, reco, side, out: Path) -> None:
    feats = side["quality"]["features"]
    names = [n for n in orig if feats.get(n, {}).get("kind") in ("continuous", "angle", "score")]
    if not names:
        return
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names):
        d = reco[name].astype(float) - orig[name].astype(float)
        if feats[name]["kind"] == "angle":
            d = np.angle(np.exp(1j * d))
        ax.hist(d, np.linspace(*_range(d), 80), histtype="stepfilled", alpha=0.7)
        ax.set_title(f"{name}: bias {feats[name]['bias']:.3g}, res {feats[name]['resolution']:.3g}", fontsize=8)
        ax.set_xlabel("reco - original")
    fig.suptitle(f"{side['object']}: residuals")
    save_figure(fig, out / "residuals.png", dpi=90)


def _pt_name(orig):
    for n in orig:
        if n.split("/")[-1] == "pt":
            return n
    return None


def plot_correlation_and_resolution(orig, reco, side, out: Path) -> None:
    name = _pt_name(orig)
    if name is None:
        return
    o, r = orig[name].astype(float), reco[name].astype(float)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    hi = np.quantile(o, 0.995)
    h = a1.hist2d(o, r, bins=[np.linspace(0, hi, 60)] * 2, cmin=1, norm=LogNorm())
    fig.colorbar(h[3], ax=a1)
    a1.plot([0, hi], [0, hi], "k--", lw=0.8)
    a1.set_xlabel(f"original {name} [GeV]")
    a1.set_ylabel(f"reconstructed {name} [GeV]")
    binned = side["quality"]["features"][name].get("relative_binned", [])
    if binned:
        x = [0.5 * (b["lo"] + min(b["hi"], 2 * max(b["lo"], 1))) for b in binned]
        a2.errorbar(x, [b["bias"] for b in binned], yerr=[b["resolution"] for b in binned], fmt="o", capsize=3,
                    label="median (bias) +- resolution")
        a2.plot(x, [b["resolution"] for b in binned], "s-", label="resolution (16-84%/2)")
        a2.axhline(0.02, color="r", ls=":", label="2% goal")
        a2.axhline(0.03, color="m", ls="--", label="3% worst-bin goal")
        a2.axhline(0, color="k", lw=0.5)
        a2.set_xscale("log")
        a2.set_xlabel(f"truth {name} [GeV]")
        a2.set_ylabel("pT reco / pT orig - 1")
        a2.legend(fontsize=7)
    fig.suptitle(f"{side['object']}: pT correlation and binned resolution vs truth")
    save_figure(fig, out / "pt_correlation_resolution.png", dpi=90)


USED_DEAD = ListedColormap(["tab:red", "tab:blue"])


def plot_codes(codes, side, out: Path) -> None:
    size = side["settings"]["codebook_size"]
    levels = codes.shape[1]
    fig, axes = plt.subplots(2, levels, figsize=(3.6 * levels, 6), squeeze=False)
    for l in range(levels):
        counts = np.bincount(codes[:, l], minlength=size)
        used = int((counts > 0).sum())
        ax = axes[0, l]
        ax.plot(np.sort(counts)[::-1], drawstyle="steps-post")
        ax.set_yscale("log")
        ax.set_title(f"q{l}: used={used}, dead={size - used}", fontsize=9)
        ax.set_xlabel("code rank")
        ax.set_ylabel("frequency")
        ax = axes[1, l]
        # one image strip, not one bar per code: 2048 bars x 4 levels took 24 s to draw per object
        ax.imshow((counts > 0)[None, :], aspect="auto", cmap=USED_DEAD, vmin=0, vmax=1, interpolation="nearest",
                  extent=(0, size, 0, 1))
        ax.set_yticks([])
        ax.set_xlabel("code index (blue used, red dead)")
    fig.suptitle(f"{side['object']}: sorted code frequency (top), used/dead codes (bottom), held-out")
    save_figure(fig, out / "codes.png", dpi=90)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    q = side["quality"]["codes"]
    ax.bar([f"q{c['level']}" for c in q], [c["used"] for c in q], label="used")
    ax.axhline(size, color="k", ls="--", label=f"codebook size {size}")
    ax.axhline(0.9 * size, color="r", ls=":", label="90% goal")
    ax.set_ylabel("used codes (held-out)")
    ax.legend(fontsize=7)
    ax.set_title(f"{side['object']}: used codes per level")
    save_figure(fig, out / "used_codes.png", dpi=90)


def plot_object(tok_dir: Path, obj: str) -> Path:
    side, orig, reco, codes = load(tok_dir, obj)
    out = tok_dir / "plots" / obj
    out.mkdir(parents=True, exist_ok=True)
    plot_histograms(orig, reco, side, out)
    plot_residuals(orig, reco, side, out)
    plot_correlation_and_resolution(orig, reco, side, out)
    plot_codes(codes, side, out)
    return out


def plot_closure(tok_dir: Path) -> Path:
    """Each closure quantity, original vs decoded, and its per-event difference (held-out events)."""
    closure = json.loads((tok_dir / "closure.json").read_text())["quantities"]
    with np.load(tok_dir / "closure.npz", allow_pickle=False) as z:
        vals = {k: z[k] for k in z.files}
    names = [n for n in QUANTITIES if closure.get(n, {}).get("n")]
    out = tok_dir / "plots" / "closure"
    dist, diffs = _grid(len(names)), _grid(len(names))
    for ax, ax_d, name in zip(dist[1], diffs[1], names):
        q, o, d = closure[name], vals[f"orig/{name}"], vals[f"decoded/{name}"]
        rel = q["difference"] == "relative"
        both = np.isfinite(o) & np.isfinite(d) & ((o > 0) if rel else True)
        bins = np.linspace(*_range(o[both]), 50)
        ax.hist(o[np.isfinite(o)], bins, histtype="step", label="original")
        ax.hist(d[np.isfinite(d)], bins, histtype="step", label="decoded")
        ax.set_xlabel(f"{name} [{q['unit']}]" if q["unit"] else name)
        ax.legend(fontsize=7)
        diff = (d[both] / o[both] - 1) if rel else d[both] - o[both]
        ax_d.hist(diff, np.linspace(*_range(diff), 60), histtype="stepfilled", alpha=0.7)
        ax_d.set_xlabel(f"{name}: " + ("decoded / original - 1" if rel else "decoded - original"))
        ax_d.set_title(f"bias {q['bias']:.2g}, resolution {q['resolution']:.2g}", fontsize=8)
    dist[0].suptitle("decoded-physics closure: original vs decoded (held-out events)")
    save_figure(dist[0], out / "closure_distributions.png", dpi=90)
    diffs[0].suptitle("decoded-physics closure: per-event difference (held-out events)")
    save_figure(diffs[0], out / "closure_differences.png", dpi=90)
    return out


def plot_dir(tok_dir, objects=None) -> list[Path]:
    tok_dir = Path(tok_dir)
    objects = objects or sorted(p.stem for p in tok_dir.glob("*.pt"))
    outs = [plot_object(tok_dir, o) for o in objects]
    if (tok_dir / "closure.json").exists():
        outs.append(plot_closure(tok_dir))
    return outs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tok_dir")
    p.add_argument("--objects", default=None, help="comma list (default: every <obj>.pt in the directory)")
    args = p.parse_args(argv)
    d = Path(args.tok_dir)
    objs = args.objects.split(",") if args.objects else None
    missing = [o for o in (objs or []) if not (d / f"{o}.eval.npz").exists()]
    if not d.is_dir() or missing:
        print(f"error: {d}: no fitted tokenizer output for {', '.join(missing) or 'this directory'}", file=sys.stderr)
        return 2
    for out in plot_dir(d, objs):
        print(f"[plot] {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
