"""Every figure of the study, drawn from saved results only (run records, summary.json, init_stats.csv, the
saved models): a plain reader of what the study wrote, which imports nothing of the study itself.

    python plots.py --results-dir results        # redraw results/figures/*.png without training

Each figure is one short function drawn at the size the report prints it (its width in FIGURES, in inches,
is what report.typ places it at), so the 7 pt minimum for text holds on paper; `save` refuses a figure with
smaller text. Accuracy panels are dot plots or curves, never truncated bars. A figure that cannot be
drawn (a missing model, no data) prints one warning line and the others are still drawn.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np

import cli
from preprocessing import CLASS_NAMES, IMAGE_SIDE, INPUT_DIM, NUM_CLASSES, DataError, to_images

TEXT_WIDTH_IN = 6.85  # A4 minus the report's 1.8 cm margins
HALF_WIDTH_IN = 3.35
MIN_FONT_PT = 7.0
DPI = 220
N_PCA = 2000          # test images in the PCA view
N_MISTAKES = 8        # most confident mistakes shown per model
CONFIDENT = 0.9       # a mistake made with at least this probability counts as confident
MODELS = ("mlp", "cnn")
SCHEME_NAMES = {"random": "random N(0, 0.01²)", "xavier": "Xavier", "he": "He", "relu": "ReLU",
                "leaky_relu": "Leaky ReLU", "tanh": "Tanh", "gelu": "GELU", "sigmoid": "Sigmoid"}
MARKERS = "osD^vP*X"
COLORS = ["#1b6ca8", "#d95f02", "#2a9d3a", "#7b3294", "#b8860b", "#555555", "#e7298a", "#17becf"]


# ------------------------------------------------------------------------------------------ drawing, saving
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7,
                         "ytick.labelsize": 7, "legend.fontsize": 7, "figure.titlesize": 8,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _figure(width_in: float, height_in: float, **kw):
    return _plt().subplots(figsize=(width_in, height_in), layout="constrained", **kw)


def _bare(ax, frame: bool = False) -> None:
    """An image panel: no ticks, and a frame only where asked."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(frame)


def small_texts(fig) -> list[str]:
    """Visible texts of `fig` set under MIN_FONT_PT (the figure is drawn at its printed size)."""
    from matplotlib.text import Text
    return [t.get_text() for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and t.get_fontsize() < MIN_FONT_PT - 1e-9]


def save(fig, path: Path) -> Path:
    try:
        small = small_texts(fig)
        if small:
            raise ValueError(f"text under {MIN_FONT_PT:g} pt: {small[:3]}")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        _plt().close(fig)
    cli.atomic_write(path, buf.getvalue())
    return path


def _save_json(ctx, name: str, data: dict) -> None:
    cli.atomic_write(ctx["root"] / "figures" / name, json.dumps(data, indent=1).encode())


# ------------------------------------------------------------------------------------------ inputs
def final_record(records: list[dict], summary: dict, model: str) -> dict | None:
    """The record of the saved final model (summary[model]["key"]), else the first final of the model."""
    key = (summary.get(model) or {}).get("key")
    finals = [r for r in records if r.get("model") == model and r.get("final")]
    return next((r for r in finals if r.get("key") == key), finals[0] if finals else None)


def model_path(ctx, model: str) -> Path:
    rec, root = ctx["finals"][model], ctx["root"]
    if rec and rec.get("model_file") and (root / rec["model_file"]).exists():
        return root / rec["model_file"]
    best = root / "models" / ("mlp_best.npz" if model == "mlp" else "cnn_best")
    if best.exists():
        return best
    raise FileNotFoundError(f"no saved {model.upper()} model ({rec and rec.get('model_file')})")


def _splits(ctx):
    if ctx["splits"] is None:
        raise ValueError("needs the data (no splits given)")
    return ctx["splits"]


def final_model(ctx, model: str):
    """The saved final model: mlp_scratch.MLP or cnn_torch's classifier (imported here: torch is slow)."""
    if model == "mlp":
        import mlp_scratch
        return mlp_scratch.MLP.load(model_path(ctx, model))
    import cnn_torch
    return cnn_torch.load_classifier(model_path(ctx, model))


def features(ctx, model: str, X: np.ndarray) -> np.ndarray:
    """What the final model's output layer sees, eval mode: the MLP's last hidden layer after its
    activation, the CNN's pooled features. (N, width)."""
    net = final_model(ctx, model)
    if model == "cnn":
        return np.asarray(net.features(to_images(X)))
    h = np.asarray(X, dtype=net.dtype)
    for layer in net.layers[:-1]:  # every layer (Standardize first, if any) but the output Linear
        h = layer.forward(h, False)
    return np.asarray(h)


def predictions(ctx, model: str) -> tuple[np.ndarray, np.ndarray]:
    """(pred, confidence) on the test set: the final record's own when it covers the whole test set, else
    recomputed from the saved model."""
    rec, X = ctx["finals"][model], _splits(ctx).X_test
    if rec.get("test_pred") is not None and len(rec["test_pred"]) == len(X) and rec.get("test_prob_max") is not None:
        return np.asarray(rec["test_pred"]), np.asarray(rec["test_prob_max"], dtype=float)
    net = final_model(ctx, model)
    z = np.asarray(net.forward(X) if model == "mlp" else net.logits(to_images(X)), dtype=np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p.argmax(axis=1), p.max(axis=1)


# ------------------------------------------------------------------------------------------ figures
def fig_class_samples(ctx, width):
    splits = _splits(ctx)
    fig, axes = _figure(width, 3.9, nrows=NUM_CLASSES, ncols=6, gridspec_kw={"wspace": 0.05, "hspace": 0.05})
    for c in range(NUM_CLASSES):
        for j, i in enumerate(np.flatnonzero(splits.y_train == c)[:6]):
            axes[c, j].imshow(splits.X_train[i].reshape(IMAGE_SIDE, IMAGE_SIDE), cmap="gray_r", vmin=0, vmax=1)
        for ax in axes[c]:
            _bare(ax)
        axes[c, 0].set_ylabel(CLASS_NAMES[c], rotation=0, ha="right", va="center", fontsize=7)
    return fig


def _phase_start(history: list[dict]) -> int | None:
    """First epoch of the head phase (frozen-feature training), if the history has phases."""
    for prev, h in zip(history, history[1:]):
        if h.get("phase") != prev.get("phase") and h.get("phase") is not None:
            return int(h["epoch"])
    return None


def fig_learning_curves(ctx, width):
    fig, axes = _figure(width, 4.2, nrows=2, ncols=2, sharex="row")
    for row, model in enumerate(MODELS):
        rec = ctx["finals"][model]
        hist = (rec or {}).get("history") or []
        for col, metric in enumerate(("loss", "acc")):
            ax = axes[row, col]
            ax.set_title(f"{model.upper()} final: {'cross-entropy loss' if metric == 'loss' else 'accuracy'}")
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
    return fig


def _init_stats(ctx, model: str):
    """init_stats.csv (written by the study beside the run records), and its rows of `model`."""
    import pandas as pd
    path = ctx["root"] / "init_stats.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    stats = pd.read_csv(path)
    if "batchnorm" not in stats:
        stats["batchnorm"] = False
    if not (stats["model"] == model).any():
        raise ValueError(f"init_stats.csv has no {model.upper()} rows")
    return stats, stats[stats["model"] == model]


def _init_panels(axes, stats, model: str, groups: list[tuple[str, bool | None]], what: str):
    """One line per (scheme, batchnorm) on each of three panels; colour = scheme, dashed = no BatchNorm.
    Lines are nudged sideways (by up to +-0.12 layer) so that coinciding ones, e.g. dead-unit
    fractions all at 0, stay visible."""
    import matplotlib.ticker
    n, schemes = len(groups), list(dict.fromkeys(g[0] for g in groups))
    for k, (scheme, bn) in enumerate(groups):
        d = stats[(stats["model"] == model) & (stats["scheme"].astype(str) == scheme)]
        if bn is not None:
            d = d[d["batchnorm"].astype(str).str.lower().isin(["true", "1", "1.0"]) == bn]
        d = d.sort_values("layer")
        if d.empty:
            continue
        colour = COLORS[schemes.index(scheme)]
        label = SCHEME_NAMES.get(scheme, scheme) + ("" if bn is None else (", BatchNorm" if bn else ", no BN"))
        x = d["layer"].to_numpy(float) + (k - (n - 1) / 2) * (0.24 / max(n - 1, 1))
        for ax, col in zip(axes, ("act_std", "grad_norm", "dead_frac")):
            ax.plot(x, d[col].to_numpy(float), ls="-" if bn in (None, True) else "--", marker=MARKERS[k % 8],
                    ms=3.5, mfc="none" if bn is False else colour, color=colour, lw=1, label=label)
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


def fig_init_stats_cnn(ctx, width):
    stats, d = _init_stats(ctx, "cnn")
    bns = [True, False] if d["batchnorm"].nunique() > 1 else [None]
    fig, axes = _figure(width, 2.6, ncols=3)
    _init_panels(axes, stats, "cnn", [(s, bn) for bn in bns for s in dict.fromkeys(d["scheme"].astype(str))],
                 "convolution")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, frameon=False)
    return fig


def fig_init_stats_mlp(ctx, width):
    stats, d = _init_stats(ctx, "mlp")
    schemes = list(dict.fromkeys(d["scheme"].astype(str)))
    inits = [s for s in schemes if s in ("random", "xavier", "he")]
    rows = [g for g in (inits, [s for s in schemes if s not in inits]) if g]  # initialisations, activations
    fig, axes = _figure(width, 2.2 * len(rows) + 0.4, nrows=len(rows), ncols=3, squeeze=False)
    for ax_row, group in zip(axes, rows):
        _init_panels(ax_row, stats, "mlp", [(s, None) for s in group], "hidden layer")
        ax_row[2].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig


def fig_confusion(ctx, width):
    fig, axes = _figure(width, 4.1, ncols=2)
    short = [c.replace("T-shirt/top", "T-shirt") for c in CLASS_NAMES]
    for ax, model in zip(axes, MODELS):
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
        ax.set_title(model.upper())
    return fig


def fig_per_class(ctx, width):
    """Dot plot of per-class test recall (a dot plot needs no zero baseline; the axis says where it starts)."""
    fig, ax = _figure(width, 2.7)
    y = np.arange(NUM_CLASSES)
    for k, model in enumerate(MODELS):
        pc = (ctx["summary"].get(model) or {}).get("per_class") or []
        if len(pc) != NUM_CLASSES:
            raise ValueError(f"summary.json has no per-class results for the {model}")
        ax.plot([c["recall"] for c in pc], y, MARKERS[k], color=COLORS[k], ms=4, label=model.upper())
    ax.set_yticks(y, CLASS_NAMES)
    ax.invert_yaxis()
    ax.set_xlabel("test recall (fraction of the class classified correctly)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, frameon=False)
    return fig


def fig_cnn_filters(ctx, width):
    import torch
    conv = next(m for m in final_model(ctx, "cnn").backbone.modules() if isinstance(m, torch.nn.Conv2d))
    w = conv.weight.detach().float().cpu().numpy()[:, 0]  # (C_out, k, k)
    ncol = 8
    nrow = -(-len(w) // ncol)
    fig, axes = _figure(width, 0.42 * nrow + 0.2, nrows=nrow, ncols=ncol, squeeze=False)
    lim = float(np.abs(w).max()) or 1.0
    for i, ax in enumerate(axes.flat):
        if i < len(w):
            ax.imshow(w[i], cmap="RdBu_r", vmin=-lim, vmax=lim)
        _bare(ax, frame=i < len(w))
    return fig


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
    splits = _splits(ctx)
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(splits.y_test), size=min(N_PCA, len(splits.y_test)), replace=False))
    X, y = splits.X_test[idx], splits.y_test[idx]
    views = [("raw pixels", f"raw pixels ({INPUT_DIM})", X)]
    for model in MODELS:
        F = features(ctx, model, X)
        views.append((f"the {model.upper()}'s features", f"{model.upper()} features ({F.shape[1]})", F))
    out = []
    for title, label, F in views:
        P, share = _pca2(F)
        out.append({"title": title, "label": label, "P": P, "variance": share, "centroid_acc": _centroid_acc(P, y)})
    return out, y


def fig_pca(ctx, width):
    views, y = pca_views(ctx)
    fig, axes = _figure(width, 2.75, ncols=3)
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
    _save_json(ctx, "pca.json", {"n": int(len(y)), "views": [{k: v[k] for k in ("title", "variance", "centroid_acc")}
                                                              for v in views]})
    return fig


def fig_confident_mistakes(ctx, width):
    splits = _splits(ctx)
    fig, axes = _figure(width, 2.6, nrows=2, ncols=N_MISTAKES, squeeze=False)
    stats = {}
    for row, model in zip(axes, MODELS):
        if ctx["finals"][model] is None:
            raise ValueError(f"no final {model} record")
        pred, conf = predictions(ctx, model)
        wrong = np.flatnonzero(pred != splits.y_test)
        worst = wrong[np.argsort(-conf[wrong], kind="stable")][:N_MISTAKES]
        stats[model] = {"n_wrong": int(len(wrong)), "n_confident": int((conf[wrong] > CONFIDENT).sum()),
                        "threshold": CONFIDENT, "n_test": int(len(pred))}
        for ax, i in zip(row, worst):
            ax.imshow(splits.X_test[i].reshape(IMAGE_SIDE, IMAGE_SIDE), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(f"{CLASS_NAMES[splits.y_test[i]]}\n→ {CLASS_NAMES[pred[i]]}\n{100 * conf[i]:.1f}%",
                         fontsize=7)
        for ax in row:
            _bare(ax)
        row[0].set_ylabel(model.upper(), fontsize=8)
    _save_json(ctx, "mistakes.json", stats)
    return fig


# name -> (printed width in inches, which report.typ places it at; the function that draws it)
FIGURES = {
    "class_samples.png": (HALF_WIDTH_IN, fig_class_samples),
    "learning_curves.png": (TEXT_WIDTH_IN, fig_learning_curves),
    "init_stats_cnn.png": (TEXT_WIDTH_IN, fig_init_stats_cnn),
    "init_stats_mlp.png": (TEXT_WIDTH_IN, fig_init_stats_mlp),
    "confusion.png": (TEXT_WIDTH_IN, fig_confusion),
    "per_class.png": (HALF_WIDTH_IN, fig_per_class),
    "cnn_filters.png": (HALF_WIDTH_IN, fig_cnn_filters),
    "pca.png": (TEXT_WIDTH_IN, fig_pca),
    "confident_mistakes.png": (TEXT_WIDTH_IN, fig_confident_mistakes),
}
FIG_WIDTH_IN = {name: width for name, (width, _) in FIGURES.items()}


def make_figures(results_dir, records: list[dict], manifest: dict | None, summary: dict | None,
                 splits=None, only=None) -> list[Path]:
    """Draw every figure (or those named in `only`) into <results_dir>/figures; return the paths written.
    A figure that fails prints one warning line (its name and why) and the others are still drawn.
    `manifest` is accepted for the callers' sake; no figure needs it."""
    summary = summary or {}
    ctx = {"root": Path(results_dir), "summary": summary, "splits": splits,
           "finals": {m: final_record(records, summary, m) for m in MODELS}}
    written = []
    for name, (width, draw) in FIGURES.items():
        if only is not None and name not in only:
            continue
        try:
            written.append(save(draw(ctx, width), ctx["root"] / "figures" / name))
        except Exception as exc:  # noqa: BLE001 - one figure must not stop the others
            _plt().close("all")
            print(f"warning: figure {name} not drawn: {type(exc).__name__}: {exc}".splitlines()[0],
                  file=sys.stderr)
    return written


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"warning: {path} is not readable JSON ({type(exc).__name__}): skipped", file=sys.stderr)
        return None


def main(argv=None) -> int:
    p = cli.ArgumentParser(description="Redraw every figure from saved results (no training).")
    p.add_argument("--results-dir", type=cli.path_arg, default="results",
                   help="the study's output folder (default: results)")
    p.add_argument("--no-data", action="store_true", help="skip the figures that need the images")
    args = p.parse_args(argv)
    rd = Path(args.results_dir)
    if not rd.is_dir():
        raise cli.UserError(f"{rd} is {'not a folder' if rd.exists() else 'not there'}: "
                            "point --results-dir at the study's output folder")
    import study_results  # the one reader of run records
    records, manifest = study_results.load_runs(rd, log=lambda line: print(line, file=sys.stderr))
    summary = _read_json(rd / "summary.json") if (rd / "summary.json").exists() else None
    if not records and not summary:
        raise cli.UserError(f"{rd} holds no study results (no runs/*.json, no summary.json): "
                            "run the study first (`python run_experiments.py`)")
    splits = None
    if not args.no_data:
        import preprocessing
        try:
            splits = preprocessing.load_splits(download=False)
        except DataError as exc:  # the figures that need no images are still drawn
            print(f"warning: no data ({exc}): the image figures are skipped", file=sys.stderr)
    written = make_figures(rd, records, manifest, summary if isinstance(summary, dict) else {}, splits)
    print(f"wrote {len(written)} of {len(FIGURES)} figures to {rd / 'figures'}")
    return 0 if len(written) == len(FIGURES) else 1


if __name__ == "__main__":
    sys.exit(cli.run(main, "plots.py", on_interrupt="the figures already drawn are kept, none half-written"))
