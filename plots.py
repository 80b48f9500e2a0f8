"""Every figure of the study, drawn from saved results only (run records, init_stats.csv, saved models).

    python plots.py --results-dir results        # redraw results/figures/*.png without training

Each figure is one short function drawn at the size the report prints it (FIG_WIDTH_IN, in inches, is
what report.typ places it at), so the 7 pt minimum for text holds on paper; `save` refuses a figure with
smaller text. Accuracy panels are dot plots or curves, never truncated bars. A figure that cannot be
drawn (a missing model, no data) prints one warning line and the others are still drawn.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np

from preprocessing import CLASS_NAMES, NUM_CLASSES, ArgumentParser, path_arg
from study_results import atomic_write

TEXT_WIDTH_IN = 6.85  # A4 minus the report's 1.8 cm margins
HALF_WIDTH_IN = 3.35
MIN_FONT_PT = 7.0
DPI = 220
N_PCA = 2000          # test images in the PCA view
N_MISTAKES = 8        # most confident mistakes shown per model
CONFIDENT = 0.9       # a mistake made with at least this probability counts as confident

# name -> printed width in inches (report.typ places each figure at exactly this width)
FIG_WIDTH_IN = {
    "class_samples.png": HALF_WIDTH_IN,
    "learning_curves.png": TEXT_WIDTH_IN,
    "init_stats_cnn.png": TEXT_WIDTH_IN,
    "init_stats_mlp.png": TEXT_WIDTH_IN,
    "confusion.png": TEXT_WIDTH_IN,
    "per_class.png": HALF_WIDTH_IN,
    "cnn_filters.png": HALF_WIDTH_IN,
    "pca.png": TEXT_WIDTH_IN,
    "confident_mistakes.png": TEXT_WIDTH_IN,
}
MODEL_NAMES = {"mlp": "MLP", "cnn": "CNN"}
SCHEME_NAMES = {"random": "random N(0, 0.01²)", "xavier": "Xavier", "he": "He", "relu": "ReLU",
                "leaky_relu": "Leaky ReLU", "tanh": "Tanh", "gelu": "GELU", "sigmoid": "Sigmoid"}
MARKERS = "osD^vP*X"
COLORS = ["#1b6ca8", "#d95f02", "#2a9d3a", "#7b3294", "#b8860b", "#555555", "#e7298a", "#17becf"]


# ------------------------------------------------------------------------------------------ saving
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7,
                         "ytick.labelsize": 7, "legend.fontsize": 7, "figure.titlesize": 8,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def small_texts(fig) -> list[str]:
    """Visible texts of `fig` set under MIN_FONT_PT (the figure is drawn at its printed size)."""
    from matplotlib.text import Text
    return [t.get_text() for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and t.get_fontsize() < MIN_FONT_PT - 1e-9]


def save(fig, path: Path) -> Path:
    plt = _plt()
    try:
        small = small_texts(fig)
        if small:
            raise ValueError(f"text under {MIN_FONT_PT:g} pt: {small[:3]}")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


def _figure(name: str, height_in: float, **kw):
    return _plt().subplots(figsize=(FIG_WIDTH_IN[name], height_in), layout="constrained", **kw)


# ------------------------------------------------------------------------------------------ inputs
def final_record(records: list[dict], summary: dict, model: str) -> dict | None:
    """The record of the saved final model (summary[model]["key"]), else the first final of the model."""
    key = (summary.get(model) or {}).get("key")
    finals = [r for r in records if r.get("model") == model and r.get("final")]
    return next((r for r in finals if r.get("key") == key), finals[0] if finals else None)


def model_path(results_dir: Path, rec: dict | None, model: str) -> Path:
    if rec and rec.get("model_file") and (results_dir / rec["model_file"]).exists():
        return results_dir / rec["model_file"]
    best = results_dir / "models" / ("mlp_best.npz" if model == "mlp" else "cnn_best")
    if best.exists():
        return best
    raise FileNotFoundError(f"no saved {MODEL_NAMES[model]} model ({rec and rec.get('model_file')})")


def mlp_hidden_features(path: Path, X: np.ndarray) -> np.ndarray:
    """The final MLP's last hidden layer (after its activation), eval mode: (N, width)."""
    import mlp_scratch
    model = mlp_scratch.MLP.load(path)
    if hasattr(model, "hidden_features"):
        return np.asarray(model.hidden_features(X))
    h = model._standardize(X) if hasattr(model, "_standardize") else np.asarray(X, np.float32)
    for layer in model.layers[:-1]:  # every layer but the output Linear
        h = layer.forward(h, False)
    return np.asarray(h)


def cnn_features(path: Path, X: np.ndarray) -> np.ndarray:
    import cnn_torch
    return np.asarray(cnn_torch.load_classifier(path).features(X.reshape(-1, 1, 28, 28)))


def predictions(results_dir: Path, rec: dict, model: str, splits) -> tuple[np.ndarray, np.ndarray]:
    """(pred, confidence) on splits.X_test: the record's own when it covers the whole test set, else
    recomputed from the saved model."""
    if rec.get("test_pred") is not None and len(rec["test_pred"]) == len(splits.y_test) \
            and rec.get("test_prob_max") is not None:
        return np.asarray(rec["test_pred"]), np.asarray(rec["test_prob_max"], dtype=float)
    path = model_path(results_dir, rec, model)
    if model == "mlp":
        import mlp_scratch
        logits = mlp_scratch.MLP.load(path).forward(splits.X_test)
    else:
        import cnn_torch
        logits = cnn_torch.load_classifier(path).logits(splits.X_test.reshape(-1, 1, 28, 28))
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p.argmax(axis=1), p.max(axis=1)


# ------------------------------------------------------------------------------------------ figures
def fig_class_samples(ctx) -> Path:
    splits = ctx["splits"]
    if splits is None:
        raise ValueError("needs the data (no splits given)")
    name = "class_samples.png"
    fig, axes = _figure(name, 3.9, nrows=NUM_CLASSES, ncols=6, gridspec_kw={"wspace": 0.05, "hspace": 0.05})
    for c in range(NUM_CLASSES):
        for j, i in enumerate(np.flatnonzero(splits.y_train == c)[:6]):
            axes[c, j].imshow(splits.X_train[i].reshape(28, 28), cmap="gray_r", vmin=0, vmax=1)
        for ax in axes[c]:
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
        axes[c, 0].set_ylabel(CLASS_NAMES[c], rotation=0, ha="right", va="center", fontsize=7)
    return save(fig, ctx["dir"] / name)


def _phase_start(history: list[dict]) -> int | None:
    """First epoch of the head phase (frozen-feature training), if the history has phases."""
    phases = [h.get("phase") for h in history]
    for prev, h in zip(phases, history[1:]):
        if h.get("phase") != prev and h.get("phase") is not None:
            return int(h["epoch"])
    return None


def fig_learning_curves(ctx) -> Path:
    name = "learning_curves.png"
    fig, axes = _figure(name, 4.2, nrows=2, ncols=2, sharex="row")
    for row, model in enumerate(("mlp", "cnn")):
        rec = ctx["finals"][model]
        hist = (rec or {}).get("history") or []
        for col, metric in enumerate(("loss", "acc")):
            ax = axes[row, col]
            ax.set_title(f"{MODEL_NAMES[model]} final: {'cross-entropy loss' if metric == 'loss' else 'accuracy'}")
            if not hist:
                ax.text(0.5, 0.5, "no history saved", ha="center", transform=ax.transAxes)
                continue
            ep = [h["epoch"] for h in hist]
            ax.plot(ep, [h[f"train_{metric}"] for h in hist], "-", color=COLORS[0], label="training")
            ax.plot(ep, [h[f"val_{metric}"] for h in hist], "--", color=COLORS[1], label="validation")
            start = _phase_start(hist)
            if start is not None:
                ax.axvline(start - 0.5, color="#7b3294", lw=1, label="head starts training on frozen features")
            if rec.get("best_epoch"):
                ax.axvline(rec["best_epoch"], color="grey", ls=":", lw=1, label="epoch whose weights were kept")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:  # one legend for all panels, above them (off the data)
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncol=2, frameon=False)
    return save(fig, ctx["dir"] / name)


def _init_panels(axes, stats, model: str, groups: list[tuple[str, bool | None]]):
    """One line per (scheme, batchnorm) on each of three panels; colour = scheme, dashed = no BatchNorm.
    Lines are nudged sideways (by up to +-0.12 layer) so that coinciding ones, e.g. dead-unit
    fractions all at 0, stay visible."""
    n = len(groups)
    for k, (scheme, bn) in enumerate(groups):
        d = stats[(stats["model"] == model) & (stats["scheme"].astype(str) == scheme)]
        if bn is not None:
            d = d[d["batchnorm"].astype(str).str.lower().isin(["true", "1", "1.0"]) == bn]
        d = d.sort_values("layer")
        if d.empty:
            continue
        colour = COLORS[sorted({g[0] for g in groups}, key=[g[0] for g in groups].index).index(scheme)]
        label = SCHEME_NAMES.get(scheme, scheme) + ("" if bn is None else (", BatchNorm" if bn else ", no BN"))
        x = d["layer"].to_numpy(float) + (k - (n - 1) / 2) * (0.24 / max(n - 1, 1))
        for ax, col in zip(axes, ("act_std", "grad_norm", "dead_frac")):
            ax.plot(x, d[col].to_numpy(float), ls="-" if bn in (None, True) else "--", marker=MARKERS[k % 8],
                    ms=3.5, mfc="none" if bn is False else colour, color=colour, lw=1, label=label)


def _init_axes(axes, what: str):
    import matplotlib.ticker
    for ax, title, log in zip(axes, ("activation std", "weight-gradient norm", "dead-unit fraction"),
                              (True, True, False)):
        ax.set_title(title)
        ax.set_xlabel(what)
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.03, 1.03)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)


def _init_stats(ctx):
    import pandas as pd
    path = ctx["dir"].parent / "init_stats.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    stats = pd.read_csv(path)
    if "batchnorm" not in stats:
        stats["batchnorm"] = False
    return stats


def fig_init_stats_cnn(ctx) -> Path:
    stats = _init_stats(ctx)
    d = stats[stats["model"] == "cnn"]
    if d.empty:
        raise ValueError("init_stats.csv has no CNN rows")
    bns = [True, False] if d["batchnorm"].nunique() > 1 else [None]
    groups = [(s, bn) for bn in bns for s in dict.fromkeys(d["scheme"].astype(str))]
    name = "init_stats_cnn.png"
    fig, axes = _figure(name, 2.6, ncols=3)
    _init_panels(axes, stats, "cnn", groups)
    _init_axes(axes, "convolution")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, frameon=False)
    return save(fig, ctx["dir"] / name)


def fig_init_stats_mlp(ctx) -> Path:
    stats = _init_stats(ctx)
    d = stats[stats["model"] == "mlp"]
    if d.empty:
        raise ValueError("init_stats.csv has no MLP rows")
    schemes = list(dict.fromkeys(d["scheme"].astype(str)))
    inits = [s for s in schemes if s in ("random", "xavier", "he")]
    acts = [s for s in schemes if s not in inits]
    rows = [g for g in (inits, acts) if g]
    name = "init_stats_mlp.png"
    fig, axes = _figure(name, 2.2 * len(rows) + 0.4, nrows=len(rows), ncols=3, squeeze=False)
    for ax_row, group in zip(axes, rows):
        _init_panels(ax_row, stats, "mlp", [(s, None) for s in group])
        _init_axes(ax_row, "hidden layer")
        ax_row[2].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return save(fig, ctx["dir"] / name)


def fig_confusion(ctx) -> Path:
    name = "confusion.png"
    fig, axes = _figure(name, 4.1, ncols=2)
    short = [c.replace("T-shirt/top", "T-shirt") for c in CLASS_NAMES]
    for ax, model in zip(axes, ("mlp", "cnn")):
        m = ctx["summary"].get(model) or {}
        if not m.get("confusion"):
            raise ValueError(f"summary.json has no {model} confusion matrix")
        cm = np.asarray(m["confusion"], dtype=int)
        off = cm.copy()
        np.fill_diagonal(off, 0)
        ax.imshow(np.log1p(off), cmap="Reds")  # colour shows the errors; the diagonal is shown as numbers
        for i in range(NUM_CLASSES):
            for j in range(NUM_CLASSES):
                ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                        color="#1b6ca8" if i == j else ("white" if off[i, j] > off.max() / 2 else "black"))
        ax.set_xticks(range(NUM_CLASSES), short, rotation=60, ha="right")
        ax.set_yticks(range(NUM_CLASSES), short if model == "mlp" else [])
        ax.set_xlabel("predicted class")
        if model == "mlp":
            ax.set_ylabel("true class")
        ax.set_title(f"{MODEL_NAMES[model]}")
    return save(fig, ctx["dir"] / name)


def fig_per_class(ctx) -> Path:
    """Dot plot of per-class test recall (a dot plot needs no zero baseline; the axis says where it starts)."""
    name = "per_class.png"
    fig, ax = _figure(name, 2.7)
    y = np.arange(NUM_CLASSES)
    for k, model in enumerate(("mlp", "cnn")):
        pc = (ctx["summary"].get(model) or {}).get("per_class") or []
        if len(pc) != NUM_CLASSES:
            raise ValueError(f"summary.json has no per-class results for the {model}")
        ax.plot([c["recall"] for c in pc], y, MARKERS[k], color=COLORS[k], ms=4, label=MODEL_NAMES[model])
    ax.set_yticks(y, CLASS_NAMES)
    ax.invert_yaxis()
    ax.set_xlabel("test recall (fraction of the class classified correctly)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, frameon=False)
    return save(fig, ctx["dir"] / name)


def fig_cnn_filters(ctx) -> Path:
    import cnn_torch
    import torch
    clf = cnn_torch.load_classifier(model_path(ctx["dir"].parent, ctx["finals"]["cnn"], "cnn"))
    conv = next(m for m in clf.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    w = conv.weight.detach().float().cpu().numpy()[:, 0]  # (C_out, k, k)
    ncol = 8
    nrow = -(-len(w) // ncol)
    name = "cnn_filters.png"
    fig, axes = _figure(name, 0.42 * nrow + 0.2, nrows=nrow, ncols=ncol, squeeze=False)
    lim = float(np.abs(w).max()) or 1.0
    for i, ax in enumerate(axes.flat):
        if i < len(w):
            ax.imshow(w[i], cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(i < len(w))
    return save(fig, ctx["dir"] / name)


def _pca2(Z: np.ndarray) -> tuple[np.ndarray, float]:
    """Projection on the first two principal components (numpy SVD) and their share of the variance."""
    Z = np.asarray(Z, dtype=np.float64)
    Z = Z - Z.mean(axis=0)
    _, s, vt = np.linalg.svd(Z, full_matrices=False)
    return Z @ vt[:2].T, float((s[:2] ** 2).sum() / max((s ** 2).sum(), 1e-300))


def _centroid_acc(P: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the nearest class mean in the 2-D projection: how well the view separates the classes."""
    means = np.stack([P[y == c].mean(axis=0) for c in range(NUM_CLASSES)])
    return float((((P[:, None, :] - means[None]) ** 2).sum(-1).argmin(1) == y).mean())


def pca_views(ctx) -> tuple[list[dict], np.ndarray]:
    """[{title, label, P (N, 2), variance, centroid_acc}] for raw pixels and each final model's features."""
    splits = ctx["splits"]
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(splits.y_test), size=min(N_PCA, len(splits.y_test)), replace=False))
    X, y = splits.X_test[idx], splits.y_test[idx]
    root = ctx["dir"].parent
    views = [("raw pixels", "raw pixels (784)", X)]
    for model, feats in (("mlp", mlp_hidden_features), ("cnn", cnn_features)):
        F = feats(model_path(root, ctx["finals"][model], model), X)
        views.append((f"the {MODEL_NAMES[model]}'s features", f"{MODEL_NAMES[model]} features ({F.shape[1]})", F))
    out = []
    for title, label, F in views:
        P, share = _pca2(F)
        out.append({"title": title, "label": label, "P": P, "variance": share, "centroid_acc": _centroid_acc(P, y)})
    return out, y


def fig_pca(ctx) -> Path:
    if ctx["splits"] is None:
        raise ValueError("needs the data (no splits given)")
    views, y = pca_views(ctx)
    name = "pca.png"
    fig, axes = _figure(name, 2.75, ncols=3)
    cmap = _plt().get_cmap("tab10")
    for ax, v in zip(axes, views):
        for c in range(NUM_CLASSES):
            m = y == c
            ax.scatter(v["P"][m, 0], v["P"][m, 1], s=2, color=cmap(c), alpha=0.6, lw=0, rasterized=True)
        ax.set_title(f"{v['label']}: {100 * v['variance']:.0f}% of variance")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker="o", ls="", color=cmap(c), ms=4) for c in range(NUM_CLASSES)]
    fig.legend(handles, CLASS_NAMES, loc="outside lower center", ncol=5, frameon=False)
    stats = {"n": int(len(y)), "views": [{k: v[k] for k in ("title", "variance", "centroid_acc")} for v in views]}
    atomic_write(ctx["dir"] / "pca.json", json.dumps(stats, indent=1).encode())
    return save(fig, ctx["dir"] / name)


def fig_confident_mistakes(ctx) -> Path:
    splits = ctx["splits"]
    if splits is None:
        raise ValueError("needs the data (no splits given)")
    name = "confident_mistakes.png"
    fig, axes = _figure(name, 2.6, nrows=2, ncols=N_MISTAKES, squeeze=False)
    stats = {}
    for row, model in zip(axes, ("mlp", "cnn")):
        rec = ctx["finals"][model]
        if rec is None:
            raise ValueError(f"no final {model} record")
        pred, conf = predictions(ctx["dir"].parent, rec, model, splits)
        wrong = np.flatnonzero(pred != splits.y_test)
        worst = wrong[np.argsort(-conf[wrong], kind="stable")][:N_MISTAKES]
        stats[model] = {"n_wrong": int(len(wrong)), "n_confident": int((conf[wrong] > CONFIDENT).sum()),
                        "threshold": CONFIDENT, "n_test": int(len(pred))}
        for ax, i in zip(row, worst):
            ax.imshow(splits.X_test[i].reshape(28, 28), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(f"{CLASS_NAMES[splits.y_test[i]]}\n→ {CLASS_NAMES[pred[i]]}\n{100 * conf[i]:.1f}%",
                         fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
        row[0].set_ylabel(MODEL_NAMES[model], fontsize=8)
    atomic_write(ctx["dir"] / "mistakes.json", json.dumps(stats, indent=1).encode())
    return save(fig, ctx["dir"] / name)


FIGURES = {
    "class_samples.png": fig_class_samples,
    "learning_curves.png": fig_learning_curves,
    "init_stats_cnn.png": fig_init_stats_cnn,
    "init_stats_mlp.png": fig_init_stats_mlp,
    "confusion.png": fig_confusion,
    "per_class.png": fig_per_class,
    "cnn_filters.png": fig_cnn_filters,
    "pca.png": fig_pca,
    "confident_mistakes.png": fig_confident_mistakes,
}


def make_figures(results_dir, records: list[dict], manifest: dict | None, summary: dict | None,
                 splits=None, only=None) -> list[Path]:
    """Draw every figure into <results_dir>/figures; return the paths written. A figure that fails
    prints one warning line (its name and why) and the others are still drawn."""
    fig_dir = Path(results_dir) / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    summary = summary or {}
    ctx = {"dir": fig_dir, "records": records, "manifest": manifest or {}, "summary": summary,
           "splits": splits, "finals": {m: final_record(records, summary, m) for m in ("mlp", "cnn")}}
    written = []
    for name, draw in FIGURES.items():
        if only is not None and name not in only:
            continue
        try:
            written.append(draw(ctx))
        except Exception as exc:  # noqa: BLE001 - one figure must not stop the others
            _plt().close("all")
            print(f"warning: figure {name} not drawn: {type(exc).__name__}: {exc}".splitlines()[0],
                  file=sys.stderr)
    return written


def load_records(results_dir: Path) -> list[dict]:
    out = []
    for p in sorted((results_dir / "runs").glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            print(f"warning: {p} is not readable JSON: skipped", file=sys.stderr)
            continue
        if isinstance(rec, dict) and "key" in rec:
            out.append(rec)
    return out


def main(argv=None) -> int:
    p = ArgumentParser(description="Redraw every figure from saved results (no training).")
    p.add_argument("--results-dir", type=path_arg, default="results",
                   help="the study's output folder (default: results)")
    p.add_argument("--no-data", action="store_true", help="skip the figures that need the images")
    args = p.parse_args(argv)
    rd = Path(args.results_dir)

    def load(name):
        try:
            return json.loads((rd / name).read_text())
        except (OSError, ValueError) as exc:
            print(f"warning: {rd / name}: {exc}", file=sys.stderr)
            return {}

    splits = None
    if not args.no_data:
        import preprocessing
        try:
            splits = preprocessing.load_splits(download=False)
        except Exception as exc:  # noqa: BLE001 - the figures that need no images are still drawn
            print(f"warning: no data ({exc}): the image figures are skipped", file=sys.stderr)
    written = make_figures(rd, load_records(rd), load("manifest.json"), load("summary.json"), splits)
    print(f"wrote {len(written)} of {len(FIGURES)} figures to {rd / 'figures'}")
    return 0 if len(written) == len(FIGURES) else 1


if __name__ == "__main__":
    sys.exit(main())
