"""Every figure of the study, drawn from saved results only (run records, summary.json, init_stats.csv, the
saved models) by make_figures, at the end of every study and by `python run_experiments.py --plots-only`
(which redraws results/figures/*.png without training). DISPLAY_NAMES and display_name, how the figures and
the report name the levels, are stated here.

Each figure is one short function drawn at the size the report prints it (its width in FIGURES, in inches,
is what report.typ places it at), so the 7 pt minimum for text holds on paper; `save` refuses a figure with
smaller text. Accuracy panels are dot plots or curves, never truncated bars. A figure that cannot be
drawn (a missing model, no data) prints one warning line and the others are still drawn.
"""
import functools
import io
import json
import sys
from pathlib import Path

import numpy as np

import cli
import mlp_scratch
from preprocessing import CLASS_NAMES, IMAGE_SIDE, NUM_CLASSES, to_images
from study_results import MODELS

TEXT_WIDTH_IN = 6.85  # A4 minus the report's 1.8 cm margins
HALF_WIDTH_IN = 3.35
MIN_FONT_PT = 7.0
DPI = 220
N_PCA = 2000          # test images in the PCA view
N_MISTAKES = 8        # most confident mistakes shown per model
CONFIDENT = 0.9       # a mistake made with at least this probability counts as confident
MARKERS = "osD^vP*X"
COLORS = ["#1b6ca8", "#d95f02", "#2a9d3a", "#7b3294", "#b8860b", "#555555", "#e7298a", "#17becf"]

# How the report and the figures name a level.
DISPLAY_NAMES = {
    "relu": "ReLU", "leaky_relu": "Leaky ReLU", "tanh": "Tanh", "gelu": "GELU", "sigmoid": "Sigmoid",
    "sgd": "SGD with momentum", "nesterov": "Nesterov momentum", "adam": "Adam", "adamw": "AdamW",
    "max": "max pooling", "avg": "average pooling", "gap": "global average pooling", "xavier": "Xavier",
    "he": "He", "random": "random N(0, 0.01²)", "joint": "joint training", "frozen": "frozen features",
    "constant": "constant width", "double": "doubling", "doubling": "doubling", "halving": "halving",
    "linear": "linear head", "bn": "BatchNorm", "batchnorm": "BatchNorm", "none": "none",
    "onecycle": "one-cycle (cosine, 25% warm-up)", "true": "yes", "false": "no", "bf16": "bfloat16",
    "fp32": "32-bit floats", "auto": "bfloat16 where native, else 32-bit"}


def display_name(study: str, v) -> str:
    """How the text names a level: 'leaky_relu' -> 'Leaky ReLU', '5' (kernel) -> '5×5', 'he, no BN' -> 'He
    without BatchNorm'."""
    v = str(v)
    if study == "cnn_kernel" and v.isdigit():
        return f"{v}×{v}"
    if study == "mlp_depth" and v.isdigit():
        return "no hidden layer" if v == "0" else f"{v} hidden layer{'s' if v != '1' else ''}"
    if v.endswith(", no BN"):
        return f"{display_name(study, v[:-7])} without BatchNorm"
    if v.startswith("x1"):
        return "widths " + " ".join("×" + t[1:] for t in v.split())
    return DISPLAY_NAMES.get(v.lower(), v)


# ------------------------------------------------------------------------------------------ drawing, saving
def warn(line: str) -> None:
    print(line, file=sys.stderr)  # sys.stderr looked up at each call: a test may have replaced it


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


def _bare(*axes, frame: bool = False) -> None:
    """Image panels: no ticks, and a frame only where asked."""
    for ax in axes:
        ax.set(xticks=[], yticks=[])
        ax.spines[:].set_visible(frame)


def _image(ax, x: np.ndarray) -> None:
    ax.imshow(x.reshape(IMAGE_SIDE, IMAGE_SIDE), cmap="gray_r", vmin=0, vmax=1)


def save(fig, path: Path) -> Path:
    """Write `fig` as a PNG, atomically; refused (ValueError) if a visible text is under MIN_FONT_PT (the
    figure is drawn at its printed size, so this is the size on paper)."""
    from matplotlib.text import Text
    try:
        if small := [t.get_text() for t in fig.findobj(Text)
                     if t.get_visible() and t.get_text().strip() and t.get_fontsize() < MIN_FONT_PT - 1e-9]:
            raise ValueError(f"text under {MIN_FONT_PT:g} pt: {small[:3]}")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        _plt().close(fig)
    cli.atomic_write(path, buf.getvalue())
    return path


# ------------------------------------------------------------------------------------------ inputs
def final_record(records: list[dict], summary: dict, model: str) -> dict:
    """The record of the saved final model (summary[model]["key"]), else the first final of the model, else {}."""
    key = (summary.get(model) or {}).get("key")
    finals = [r for r in records if r.get("model") == model and r.get("final")]
    return next((r for r in finals if r.get("key") == key), finals[0] if finals else {})


def _splits(ctx):
    if ctx["splits"] is None:
        raise ValueError("needs the data (no splits given)")
    return ctx["splits"]


def final_model(ctx, model: str):
    """The final record's saved model: an mlp_scratch.MLP, or cnn_torch's classifier (cnn_torch is imported here:
    torch is slow to import)."""
    rec = ctx["finals"][model]
    if not rec.get("model_file"):
        raise FileNotFoundError(f"no saved {model.upper()} model")
    if model == "mlp":
        return mlp_scratch.MLP.load(ctx["root"] / rec["model_file"])
    import cnn_torch
    return cnn_torch.load_classifier(ctx["root"] / rec["model_file"])


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
    p = mlp_scratch.softmax(np.asarray(net.forward(X) if model == "mlp" else net.logits(to_images(X)), np.float64))
    return p.argmax(axis=1), p.max(axis=1)


# ------------------------------------------------------------------------------------------ figures
def fig_class_samples(ctx, width):
    splits = _splits(ctx)
    fig, axes = _figure(width, 3.9, nrows=NUM_CLASSES, ncols=6, gridspec_kw={"wspace": 0.05, "hspace": 0.05})
    for c in range(NUM_CLASSES):
        for j, i in enumerate(np.flatnonzero(splits.y_train == c)[:6]):
            _image(axes[c, j], splits.X_train[i])
        _bare(*axes[c])
        axes[c, 0].set_ylabel(CLASS_NAMES[c], rotation=0, ha="right", va="center", fontsize=7)
    return fig


def fig_learning_curves(ctx, width):
    fig, axes = _figure(width, 4.2, nrows=2, ncols=2, sharex="row")
    for ax, (model, metric) in zip(axes.flat, [(m, metric) for m in MODELS for metric in ("loss", "acc")]):
        rec = ctx["finals"][model]
        hist = rec.get("history") or []
        # the first epoch of the head phase (training on frozen features), if the history has phases
        starts = [h["epoch"] for prev, h in zip(hist, hist[1:]) if h.get("phase") not in (None, prev.get("phase"))]
        ax.set_title(f"{model.upper()} final: {'cross-entropy loss' if metric == 'loss' else 'accuracy'}")
        if not hist:
            ax.text(0.5, 0.5, "no history saved", ha="center", transform=ax.transAxes)
            continue
        ep = [h["epoch"] for h in hist]
        ax.plot(ep, [h[f"train_{metric}"] for h in hist], "-", color=COLORS[0], label="training")
        ax.plot(ep, [h[f"val_{metric}"] for h in hist], "--", color=COLORS[1], label="validation")
        if starts:
            ax.axvline(starts[0] - 0.5, color="#7b3294", lw=1, label="head starts training on frozen features")
        if rec.get("best_epoch"):
            ax.axvline(rec["best_epoch"], color="grey", ls=":", lw=1, label="epoch whose weights were kept")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    # one legend for all panels, above them (off the data): each label once, in order of first appearance
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncol=2, frameon=False)
    return fig


# the three panels of an initialisation figure: column of init_stats.csv, title, y axis
INIT_PANELS = (("act_std", "activation std", {"yscale": "log"}),
               ("grad_norm", "weight-gradient norm", {"yscale": "log"}),
               ("dead_frac", "dead-unit fraction", {"ylim": (-0.03, 1.03)}))


def _init_panels(axes, stats, groups: list[tuple[str, bool | None]], what: str):
    """One line per (scheme, batchnorm) on each of three panels; colour = scheme, dashed = no BatchNorm.
    Lines are nudged sideways (by up to +-0.12 layer) so that coinciding ones, e.g. dead-unit
    fractions all at 0, stay visible."""
    import matplotlib.ticker
    n, schemes = len(groups), list(dict.fromkeys(g[0] for g in groups))
    for k, (scheme, bn) in enumerate(groups):
        d = stats[stats["scheme"] == scheme].sort_values("layer")
        if bn is not None:
            d = d[d["batchnorm"] == bn]
        if d.empty:
            continue
        colour = COLORS[schemes.index(scheme)]
        label = DISPLAY_NAMES.get(scheme, scheme) + ("" if bn is None else (", BatchNorm" if bn else ", no BN"))
        x = d["layer"].to_numpy(float) + (k - (n - 1) / 2) * (0.24 / max(n - 1, 1))
        for ax, (col, _, _) in zip(axes, INIT_PANELS):
            ax.plot(x, d[col].to_numpy(float), ls="-" if bn in (None, True) else "--", marker=MARKERS[k % 8],
                    ms=3.5, mfc="none" if bn is False else colour, color=colour, lw=1, label=label)
    for ax, (_, title, y_axis) in zip(axes, INIT_PANELS):
        ax.set(title=title, xlabel=what, **y_axis)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)


def fig_init_stats(ctx, width, model: str):
    """The rows of `model` in init_stats.csv (written by the study beside the run records). CNN: one row of
    panels, each scheme with and without BatchNorm; MLP: a row of initialisations, then one of activations."""
    import pandas as pd
    d = pd.read_csv(ctx["root"] / "init_stats.csv")
    d = d[d["model"] == model]
    if d.empty:
        raise ValueError(f"init_stats.csv has no {model.upper()} rows")
    schemes = list(dict.fromkeys(d["scheme"]))
    if model == "cnn":
        fig, axes = _figure(width, 2.6, ncols=3)
        _init_panels(axes, d, [(s, bn) for bn in (True, False) for s in schemes], "convolution")
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, frameon=False)
        return fig
    inits = [s for s in schemes if s in mlp_scratch.INITS]
    rows = [g for g in (inits, [s for s in schemes if s not in inits]) if g]  # initialisations, activations
    fig, axes = _figure(width, 2.2 * len(rows) + 0.4, nrows=len(rows), ncols=3, squeeze=False)
    for ax_row, group in zip(axes, rows):
        _init_panels(ax_row, d, [(s, None) for s in group], "hidden layer")
        ax_row[2].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig


def fig_confusion(ctx, width):
    fig, axes = _figure(width, 4.1, ncols=2)
    short = [c.replace("T-shirt/top", "T-shirt") for c in CLASS_NAMES]
    for ax, model in zip(axes, MODELS):
        if not (ctx["summary"].get(model) or {}).get("confusion"):
            raise ValueError(f"summary.json has no {model} confusion matrix")
        cm = np.asarray(ctx["summary"][model]["confusion"], dtype=int)
        off = cm * (1 - np.eye(NUM_CLASSES, dtype=int))  # the errors only
        ax.imshow(np.log1p(off), cmap="Reds")  # colour shows the errors; the diagonal is shown as numbers
        for i, j in np.ndindex(cm.shape):
            ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                    color="#1b6ca8" if i == j else ("white" if off[i, j] > off.max() / 2 else "black"))
        ax.set_xticks(range(NUM_CLASSES), short, rotation=60, ha="right")
        ax.set_yticks(range(NUM_CLASSES), short if model == "mlp" else [])
        ax.set(xlabel="predicted class", ylabel="true class" if model == "mlp" else "", title=model.upper())
    return fig


N_BINS = 15  # equal-width confidence bins of the reliability diagram and the ECE (Guo et al. 2017)


def calibration_bins(conf: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> list[dict]:
    """The non-empty equal-width bins of top-class confidence: {n, conf (mean), acc (fraction correct)}. The
    expected calibration error is sum(n |acc - conf|) / N over them (report/build.py)."""
    conf, correct = np.asarray(conf, dtype=float), np.asarray(correct, dtype=bool)
    idx = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    return [{"n": int((idx == b).sum()), "conf": float(conf[idx == b].mean()), "acc": float(correct[idx == b].mean())}
            for b in range(n_bins) if (idx == b).any()]


def fig_calibration(ctx, width):
    """Reliability diagram of both final models: accuracy against confidence per bin (dots sized by count)."""
    fig, ax = _figure(width, 2.9)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfect calibration")
    for k, model in enumerate(MODELS):
        rec = ctx["finals"][model]
        if not rec.get("test_prob_max") or not rec.get("test_true"):
            raise ValueError(f"the {model.upper()} final record has no test probabilities")
        bins = calibration_bins(rec["test_prob_max"], np.asarray(rec["test_pred"]) == np.asarray(rec["test_true"]))
        n, conf, acc = (np.array([b[f] for b in bins], dtype=float) for f in ("n", "conf", "acc"))
        ax.plot(conf, acc, "-", color=COLORS[k], lw=1)
        ax.scatter(conf, acc, s=4 + 60 * n / n.max(), marker=MARKERS[k], color=COLORS[k], label=model.upper(), zorder=3)
    ax.set(xlabel="confidence (top-class probability)", ylabel="accuracy in the bin", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", frameon=False)
    return fig


def fig_cnn_filters(ctx, width):
    w = final_model(ctx, "cnn").backbone.convs[0].weight.detach().float().cpu().numpy()[:, 0]  # (C_out, k, k)
    nrow = -(-len(w) // 8)
    fig, axes = _figure(width, 0.42 * nrow + 0.2, nrows=nrow, ncols=8, squeeze=False)
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


def fig_pca(ctx, width):
    """N_PCA test images as raw pixels and as each final model's features, on their first two principal
    components; pca.json keeps each view's share of the variance and nearest-class-mean accuracy."""
    splits = _splits(ctx)
    n = len(splits.y_test)
    idx = np.sort(np.random.default_rng(0).choice(n, size=min(N_PCA, n), replace=False))
    X, y = splits.X_test[idx], splits.y_test[idx]
    views = [("raw pixels", "raw pixels", X)]
    views += [(f"the {m.upper()}'s features", f"{m.upper()} features", features(ctx, m, X)) for m in MODELS]
    fig, axes = _figure(width, 2.75, ncols=3)
    cmap = _plt().get_cmap("tab10")
    stats = []
    for ax, (title, label, F) in zip(axes, views):
        P, share = _pca2(F)
        stats.append({"title": title, "variance": share, "centroid_acc": _centroid_acc(P, y)})
        for c in range(NUM_CLASSES):
            ax.scatter(P[y == c, 0], P[y == c, 1], s=2, color=cmap(c), alpha=0.6, lw=0, rasterized=True)
        ax.set(title=f"{label} ({F.shape[1]}): {100 * share:.0f}% of variance", xticks=[], yticks=[], xlabel="PC 1",
               ylabel="PC 2")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker="o", ls="", color=cmap(c), ms=4) for c in range(NUM_CLASSES)]
    fig.legend(handles, CLASS_NAMES, loc="outside lower center", ncol=5, frameon=False)
    cli.atomic_write(ctx["root"] / "figures" / "pca.json", json.dumps({"n": int(len(y)), "views": stats}, indent=1))
    return fig


def fig_confident_mistakes(ctx, width):
    splits = _splits(ctx)
    fig, axes = _figure(width, 2.6, nrows=2, ncols=N_MISTAKES, squeeze=False)
    stats = {}
    for row, model in zip(axes, MODELS):
        pred, conf = predictions(ctx, model)
        wrong = np.flatnonzero(pred != splits.y_test)
        worst = wrong[np.argsort(-conf[wrong], kind="stable")][:N_MISTAKES]
        stats[model] = {"n_wrong": int(len(wrong)), "n_confident": int((conf[wrong] > CONFIDENT).sum()),
                        "threshold": CONFIDENT, "n_test": int(len(pred))}
        for ax, i in zip(row, worst):
            _image(ax, splits.X_test[i])
            ax.set_title(f"{CLASS_NAMES[splits.y_test[i]]}\n→ {CLASS_NAMES[pred[i]]}\n{100 * conf[i]:.1f}%",
                         fontsize=7)
        _bare(*row)
        row[0].set_ylabel(model.upper(), fontsize=8)
    cli.atomic_write(ctx["root"] / "figures" / "mistakes.json", json.dumps(stats, indent=1))
    return fig


# name -> (printed width in inches, which report.typ places it at; the function that draws it)
FIGURES = {
    "class_samples.png": (HALF_WIDTH_IN, fig_class_samples),
    "learning_curves.png": (TEXT_WIDTH_IN, fig_learning_curves),
    "init_stats_cnn.png": (TEXT_WIDTH_IN, functools.partial(fig_init_stats, model="cnn")),
    "init_stats_mlp.png": (TEXT_WIDTH_IN, functools.partial(fig_init_stats, model="mlp")),
    "confusion.png": (TEXT_WIDTH_IN, fig_confusion),
    "calibration.png": (HALF_WIDTH_IN, fig_calibration),
    "cnn_filters.png": (HALF_WIDTH_IN, fig_cnn_filters),
    "pca.png": (TEXT_WIDTH_IN, fig_pca),
    "confident_mistakes.png": (TEXT_WIDTH_IN, fig_confident_mistakes),
}
FIG_WIDTH_IN = {name: width for name, (width, _) in FIGURES.items()}


def make_figures(results_dir, records: list[dict], summary: dict | None, splits=None, only=None) -> list[Path]:
    """Draw every figure (or those named in `only`) into <results_dir>/figures; return the paths written.
    A figure that fails prints one warning line (its name and why) and the others are still drawn."""
    summary = summary or {}
    ctx = {"root": Path(results_dir), "summary": summary, "splits": splits,
           "finals": {m: final_record(records, summary, m) for m in MODELS}}
    written = []
    for name, (width, draw) in [(n, f) for n, f in FIGURES.items() if only is None or n in only]:
        try:
            written.append(save(draw(ctx, width), ctx["root"] / "figures" / name))
        except Exception as exc:  # noqa: BLE001 - one figure must not stop the others
            _plt().close("all")
            warn(f"warning: figure {name} not drawn: {type(exc).__name__}: {exc}".splitlines()[0])
    return written

