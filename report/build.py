"""Build report/report.pdf from the study's saved results (assignment Q4).

    python -m report.build                         # results/ -> report/report.pdf
    python -m report.build --results-dir results-quick --out /tmp/r.pdf

Nothing in `report.typ` is a number typed by hand: this module reads the results (the schema in
run_experiments.py: mlp_runs.csv, cnn_runs.csv, curves.csv, init_stats.csv, summary.json, figures/*.png),
computes every table and every result-dependent sentence into `facts.json`, and compiles the Typst source
in-process with the `typst` package. Every claim those sentences make is listed in `facts["claims"]`, and
`check_claims` re-derives each one from the CSVs before the PDF is written: a report that contradicts its
results does not build.

Group names, e-mails and contributions come from report/group.toml (placeholders until filled in).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd

REPORT_DIR = Path(__file__).resolve().parent
REPO_DIR = REPORT_DIR.parent
TYP_SOURCE = REPORT_DIR / "report.typ"
BIB_SOURCE = REPORT_DIR / "references.bib"
GROUP_FILE = REPORT_DIR / "group.toml"

sys.path.insert(0, str(REPO_DIR))  # the scripts live at the repository root
from preprocessing import CLASS_NAMES  # noqa: E402


# Known comparisons, in report order: (title, factor changed, config field it varies).
STUDIES = {
    "mlp_activation": ("Activation function", "activation", "activation"),
    "mlp_depth": ("Number of hidden layers", "depth", "hidden"),
    "mlp_width": ("Width of the hidden layers", "width", "hidden"),
    "mlp_dropout": ("Dropout rate", "dropout", "dropout"),
    "mlp_optimizer": ("Optimizer", "optimizer", "optimizer"),
    "mlp_lr": ("Learning rate", "learning rate", "lr"),
    "cnn_pool": ("Pooling", "pooling", "pool"),
    "cnn_kernel": ("Kernel size", "kernel size", "kernel_size"),
    "cnn_filters": ("Filters per layer", "filter schedule", "filters"),
    "cnn_init": ("Weight initialisation", "initialisation", "init"),
    "cnn_head_mode": ("Joint against frozen features", "head training", "head_mode"),
    "cnn_head": ("Size, activation and dropout of the MLP head", "head", "head_hidden"),
}
FINAL_STUDIES = ("mlp_final", "cnn_final")
NOISE_Z = 2.0  # a gap counts as beyond seed noise when it exceeds 2 standard errors of the difference
REL_TOL = 1e-9  # claims store raw floats; check_claims recomputes them from the CSVs to this tolerance


class ReportError(Exception):
    """One-line, user-facing reason why the report cannot be built."""


class ContradictionError(ReportError):
    """A statement in the report disagrees with the results files."""


# ------------------------------------------------------------------------------------------ formatting
def pct(x, digits=2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def pts(x, digits=2) -> str:
    """A difference of two accuracies, in percentage points."""
    return f"{100 * x:.{digits}f}"


def pm(mean, std, n) -> str:
    if n < 2 or std is None or math.isnan(std):
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def sci(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x == 0:
        return "0"
    if 1e-2 <= abs(x) < 1e3:
        return f"{x:.3g}"
    mant, exp = f"{x:.2e}".split("e")
    return f"{mant}e{int(exp)}"


def fmt_value(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return " × ".join(str(x) for x in v) if v else "none"
    if v is None:
        return "none"
    return str(v)


# ------------------------------------------------------------------------------------------ loading
def load_results(results_dir) -> dict:
    """Read every results file the report needs; a missing one stops with a one-line message."""
    rd = Path(results_dir)
    if not rd.is_dir():
        raise ReportError(f"results directory {rd} does not exist: run `make study` (or "
                          f"`python run_experiments.py --quick --results-dir {rd}`) first")
    out = {"dir": rd}
    for name in ("mlp_runs", "cnn_runs", "curves", "init_stats"):
        path = rd / f"{name}.csv"
        if not path.is_file():
            raise ReportError(f"{path} is missing: the study has not finished (rerun run_experiments.py)")
        out[name] = pd.read_csv(path)
    path = rd / "summary.json"
    if not path.is_file():
        raise ReportError(f"{path} is missing: the study has not finished (rerun run_experiments.py)")
    out["summary"] = json.loads(path.read_text())
    for key in ("mlp", "cnn", "study"):
        if key not in out["summary"]:
            raise ReportError(f"{path} has no '{key}' entry")
    return out


def _runs(results: dict, model: str) -> pd.DataFrame:
    return results[f"{model}_runs"]


# ------------------------------------------------------------------------------------------ statistics
def aggregate(df: pd.DataFrame, study: str) -> list[dict]:
    """Per variant of one comparison: n seeds, mean and std (ddof=1) of val/train/test accuracy, etc.

    Diverged runs are counted and kept out of the means (their accuracy says nothing about the level)."""
    sub = df[df["study"] == study]
    rows = []
    # Variants in the order the study ran them (its grid order), not alphabetically.
    for variant in dict.fromkeys(sub["variant"].astype(str)):
        g = sub[sub["variant"].astype(str) == variant]
        div = g["diverged"].astype(str).str.lower().isin(["true", "1", "1.0"])
        ok = g[~div]
        n = len(ok)
        row = {"variant": variant, "n": int(n), "n_diverged": int(div.sum())}
        for col in ("val_acc", "train_acc", "test_acc"):
            v = ok[col].astype(float)
            row[f"{col}_mean"] = float(v.mean()) if n else float("nan")
            row[f"{col}_std"] = float(v.std(ddof=1)) if n > 1 else float("nan")
        for col in ("sec_per_epoch", "epochs_run", "n_params"):
            row[col] = float(g[col].astype(float).mean()) if col in g and len(g) else float("nan")
        rows.append(row)
    return rows


def pooled_noise_sd(rows: list[dict]) -> float | None:
    """Seed-to-seed std of val accuracy, pooled over the variants run with >= 2 seeds."""
    num = sum((r["n"] - 1) * r["val_acc_std"] ** 2 for r in rows if r["n"] > 1)
    dof = sum(r["n"] - 1 for r in rows if r["n"] > 1)
    return math.sqrt(num / dof) if dof > 0 else None


def compare(rows: list[dict]) -> dict:
    """Winner, runner-up, gap, and whether the gap exceeds the seed noise."""
    valid = [r for r in rows if r["n"] > 0]
    if not valid:
        return {"winner": None}
    # As in the study's choice, a level with a diverged seed cannot win (unless every level diverged once).
    eligible = [r for r in valid if r["n_diverged"] == 0] or valid
    ranked = sorted(eligible, key=lambda r: -r["val_acc_mean"])
    best = ranked[0]
    out = {"winner": best["variant"], "winner_mean": best["val_acc_mean"], "winner_n": best["n"],
           "runner_up": None, "gap": None, "se": None, "beyond_noise": None,
           "worst": ranked[-1]["variant"], "spread": best["val_acc_mean"] - ranked[-1]["val_acc_mean"]}
    sd = pooled_noise_sd(valid)
    out["noise_sd"] = sd
    if len(ranked) > 1:
        second = ranked[1]
        out["runner_up"] = second["variant"]
        out["gap"] = best["val_acc_mean"] - second["val_acc_mean"]
        if sd is not None:
            out["se"] = sd * math.sqrt(1 / best["n"] + 1 / second["n"])
            out["beyond_noise"] = bool(out["gap"] > NOISE_Z * out["se"])
    return out


# ------------------------------------------------------------------------------------------ facts
class Facts:
    """Collects the report's facts and, beside each result-dependent number, a claim to re-check."""

    def __init__(self):
        self.claims: list[dict] = []

    def claim(self, **kw):
        self.claims.append(kw)


def study_sentence(factor: str, cmp: dict, rows: list[dict]) -> str:
    if cmp.get("winner") is None:
        return "Every run of this comparison diverged, so it has no winner."
    w = next(r for r in rows if r["variant"] == cmp["winner"])
    seeds = f"{w['n']} seed{'s' if w['n'] != 1 else ''}"
    s = (f"The best {factor} is {cmp['winner']}, with a mean validation accuracy of "
         f"{pm(w['val_acc_mean'], w['val_acc_std'], w['n'])}% ({seeds}).")
    diverged = [r["variant"] for r in rows if r["n_diverged"]]
    if diverged:
        s += (f" Runs diverged (loss NaN or infinite) with {', '.join(diverged)}; those runs are left out "
              f"of the means, and a level with a diverged run is not eligible to win.")
    if cmp["runner_up"] is None:
        return s + " It is the only level in this comparison's results, so there is nothing to rank."
    s += f" It leads {cmp['runner_up']} by {pts(cmp['gap'])} points"
    if cmp["beyond_noise"] is None:
        s += "; with one seed per level the seed noise cannot be estimated, so the ranking is tentative."
    elif cmp["beyond_noise"]:
        s += (f", more than {NOISE_Z:g} standard errors of the difference ({pts(NOISE_Z * cmp['se'])} points, "
              f"from a seed-to-seed std of {pts(cmp['noise_sd'])}): the difference exceeds the seed noise.")
    else:
        s += (f", within {NOISE_Z:g} standard errors of the difference ({pts(NOISE_Z * cmp['se'])} points, "
              f"from a seed-to-seed std of {pts(cmp['noise_sd'])}): the top two are indistinguishable "
              f"at this number of seeds.")
    if cmp["spread"] > 0 and cmp["worst"] not in (cmp["winner"], cmp["runner_up"]):
        s += f" The spread from best to worst ({cmp['worst']}) is {pts(cmp['spread'])} points."
    return s


def evidence_sentence(rows: list[dict], f: Facts, file: str, study: str) -> str:
    """Overfitting (train - validation gap) and cost per level: the evidence beside each ranking."""
    ok = [r for r in rows if r["n"] > 0]
    if len(ok) < 2:
        return ""
    gap = {r["variant"]: r["train_acc_mean"] - r["val_acc_mean"] for r in ok}
    hi, lo = max(gap, key=gap.get), min(gap, key=gap.get)
    f.claim(type="gap_extremes", file=file, study=study, largest=hi, smallest=lo)
    s = (f"The train − validation gap, a measure of overfitting, is largest with {hi} ({pts(gap[hi])} points) "
         f"and smallest with {lo} ({pts(gap[lo])} points).")
    sec = {r["variant"]: r["sec_per_epoch"] for r in ok if not math.isnan(r["sec_per_epoch"])}
    if len(sec) > 1:
        slow, fast = max(sec, key=sec.get), min(sec, key=sec.get)
        if sec[fast] > 0 and sec[slow] > 1.2 * sec[fast]:
            s += (f" An epoch takes {sec[fast]:.1f} s with {fast} and {sec[slow]:.1f} s with {slow} "
                  f"({sec[slow] / sec[fast]:.1f}×).")
    return s


def make_study_facts(results: dict, f: Facts, figures: dict) -> list[dict]:
    out = []
    for model in ("mlp", "cnn"):
        df = _runs(results, model)
        present = list(dict.fromkeys(df["study"].astype(str)))
        order = [s for s in STUDIES if s in present] + [s for s in present
                                                        if s not in STUDIES and s not in FINAL_STUDIES]
        for study in order:
            if not study.startswith(model):
                continue
            title, factor, _field = STUDIES.get(study, (study.replace("_", " "), "setting", None))
            rows = aggregate(df, study)
            cmp = compare(rows)
            file = f"{model}_runs.csv"
            for r in rows:
                f.claim(type="agg", file=file, study=study, variant=r["variant"], field="val_acc",
                        stat="mean", value=r["val_acc_mean"])
                f.claim(type="agg", file=file, study=study, variant=r["variant"], field="val_acc",
                        stat="std", value=r["val_acc_std"])
                f.claim(type="agg", file=file, study=study, variant=r["variant"], field="val_acc",
                        stat="n", value=r["n"])
                f.claim(type="agg", file=file, study=study, variant=r["variant"], field="train_acc",
                        stat="mean", value=r["train_acc_mean"])
            if cmp.get("winner") is not None:
                f.claim(type="winner", file=file, study=study, variant=cmp["winner"])
                if cmp["runner_up"] is not None:
                    f.claim(type="noise", file=file, study=study, a=cmp["winner"], b=cmp["runner_up"],
                            beyond=cmp["beyond_noise"], gap=cmp["gap"])
            table = [[r["variant"], str(r["n"]) + (f" (+{r['n_diverged']} div.)" if r["n_diverged"] else ""),
                      pm(r["val_acc_mean"], r["val_acc_std"], r["n"]) if r["n"] else "diverged",
                      pct(r["train_acc_mean"]).rstrip("%"),
                      pts(r["train_acc_mean"] - r["val_acc_mean"]) if r["n"] else "–",
                      f"{r['sec_per_epoch']:.1f}" if not math.isnan(r["sec_per_epoch"]) else "–",
                      f"{int(r['n_params']):,}" if not math.isnan(r["n_params"]) else "–"]
                     for r in rows]
            out.append({"id": study, "model": model, "title": title, "factor": factor,
                        "rows": table, "winner": cmp.get("winner"),
                        "winner_row": next((i for i, r in enumerate(rows) if r["variant"] == cmp.get("winner")), -1),
                        "sentence": study_sentence(factor, cmp, rows),
                        "evidence": evidence_sentence(rows, f, file, study),
                        "figure": None})  # the per-track figure (compare_<model>.png) shows every stage
    return out


INIT_SCHEMES = ("random", "xavier", "he")


def init_groups(st: pd.DataFrame) -> dict[str, tuple[str, list[str]]]:
    """init_stats.csv holds three comparisons: the MLP per init (ReLU), the MLP per activation (its default
    init), the CNN per init. Group name -> (model, schemes in file order)."""
    out = {}
    for model in ("mlp", "cnn"):
        schemes = list(dict.fromkeys(st[st["model"] == model]["scheme"].astype(str)))
        inits = [s for s in schemes if s in INIT_SCHEMES]
        if inits:
            out[f"{model}_init"] = (model, inits)
        acts = [s for s in schemes if s not in INIT_SCHEMES]
        if acts:
            out[f"{model}_activation"] = (model, acts)
    return out


def make_init_facts(results: dict, f: Facts) -> dict:
    """Per-layer statistics at initialisation, and sentences that read them."""
    st = results["init_stats"]
    out = {g: {"rows": [], "sentences": []} for g in ("mlp_init", "mlp_activation", "cnn_init")}
    mlp_layers = st[st["model"] == "mlp"]["layer"]
    out["mlp_layers"] = str(int(mlp_layers.nunique())) if len(mlp_layers) else "–"
    for group, (model, schemes) in init_groups(st).items():
        sub = st[st["model"] == model]
        rows, info = [], {}
        for scheme in schemes:
            g = sub[sub["scheme"].astype(str) == scheme].sort_values("layer")
            first, last = g.iloc[0], g.iloc[-1]
            d = {"first_layer": int(first["layer"]), "last_layer": int(last["layer"]),
                 "act_std_first": float(first["act_std"]), "act_std_last": float(last["act_std"]),
                 "grad_first": float(first["grad_norm"]), "grad_last": float(last["grad_norm"]),
                 "dead_max": float(g["dead_frac"].max())}
            info[scheme] = d
            for layer, fld in ((d["first_layer"], "act_std"), (d["last_layer"], "act_std"),
                               (d["first_layer"], "grad_norm"), (d["last_layer"], "grad_norm")):
                val = float(g[g["layer"] == layer][fld].iloc[0])
                f.claim(type="init", model=model, scheme=scheme, layer=layer, field=fld, value=val)
            f.claim(type="init_max", model=model, scheme=scheme, field="dead_frac", value=d["dead_max"])
            rows.append([scheme, sci(d["act_std_first"]), sci(d["act_std_last"]), sci(d["grad_first"]),
                         sci(d["grad_last"]), pct(d["dead_max"], 1)])
        where = "hidden" if model == "mlp" else "convolutional"
        sentences = []
        # The scheme whose signal shrinks most through depth, against the one that keeps it best.
        ratio = {s: d["act_std_last"] / d["act_std_first"] for s, d in info.items() if d["act_std_first"] > 0}
        if len(ratio) > 1:
            lo, hi = min(ratio, key=ratio.get), max(ratio, key=ratio.get)
            sentences.append(
                f"From the first to the last {where} layer the activation std is multiplied by "
                f"{sci(ratio[lo])} with {lo} ({sci(info[lo]['act_std_first'])} to {sci(info[lo]['act_std_last'])}) "
                f"and by {sci(ratio[hi])} with {hi} ({sci(info[hi]['act_std_first'])} to "
                f"{sci(info[hi]['act_std_last'])}).")
        grads = {s: d["grad_first"] for s, d in info.items()}
        if len(grads) > 1:
            lo, hi = min(grads, key=grads.get), max(grads, key=grads.get)
            if grads[lo] > 0:
                sentences.append(
                    f"The weight gradient of the first layer is smallest with {lo} (norm {sci(grads[lo])}, "
                    f"{sci(grads[hi] / grads[lo])} times below {hi}'s {sci(grads[hi])}).")
            else:
                sentences.append(f"With {lo} no gradient reaches the first layer (norm 0), against "
                                 f"{sci(grads[hi])} with {hi}.")
            f.claim(type="init_order", model=model, schemes=schemes, by="grad_first", lowest=lo, highest=hi)
        dead = {s: d["dead_max"] for s, d in info.items()}
        worst = max(dead, key=dead.get)
        if dead[worst] > 0:
            sentences.append(f"The largest fraction of units that output zero for every image of the batch "
                             f"(dead units) in any layer is {pct(dead[worst], 1)}, with {worst}.")
        else:
            sentences.append("No unit is dead at initialisation under any of these schemes.")
        out[group] = {"rows": rows, "sentences": sentences}
    return out


def make_curve_facts(results: dict, f: Facts) -> dict:
    """Train-versus-validation gap and best epoch of each final model (the chosen final run), from curves.csv."""
    cv = results["curves"]
    out = {}
    for model, study in (("mlp", "mlp_final"), ("cnn", "cnn_final")):
        sub = cv[cv["study"] == study]
        chosen = results["summary"].get(model, {}).get("key")
        if chosen is not None and (sub["key"] == chosen).any():
            sub = sub[sub["key"] == chosen]
        if sub.empty:
            out[model] = None
            continue
        key = sub["key"].iloc[0]
        g = sub[sub["key"] == key].sort_values("epoch")
        best = g.loc[g["val_acc"].astype(float).idxmax()]
        last = g.iloc[-1]
        d = {"epochs": int(last["epoch"]), "best_epoch": int(best["epoch"]),
             "best_val": float(best["val_acc"]), "last_train": float(last["train_acc"]),
             "last_val": float(last["val_acc"]), "gap": float(last["train_acc"] - last["val_acc"])}
        for fld, val in (("train_acc", d["last_train"]), ("val_acc", d["last_val"])):
            f.claim(type="curve", study=study, key=str(key), epoch=d["epochs"], field=fld, value=val)
        f.claim(type="curve_best", study=study, key=str(key), epoch=d["best_epoch"], value=d["best_val"])
        over = d["gap"] > 0.02
        d["sentence"] = (
            f"Over {d['epochs']} epochs validation accuracy peaks at {pct(d['best_val'])} in epoch "
            f"{d['best_epoch']}; at the end the model fits its training set to {pct(d['last_train'])} against "
            f"{pct(d['last_val'])} on validation, a gap of {pts(d['gap'])} points"
            + (": it fits its training images noticeably better than unseen ones, which is what dropout, "
               "weight decay and early stopping on validation (best weights restored) hold in check." if over
               else ", so it does not overfit noticeably at this budget."))
        out[model] = d
    return out


def config_rows(cfg: dict) -> list[list[str]]:
    return [[k, fmt_value(v)] for k, v in cfg.items() if k not in ("device",)]


def make_final_facts(results: dict, f: Facts) -> dict:
    s = results["summary"]
    out = {}
    for model in ("mlp", "cnn"):
        m = s[model]
        for fld in ("val_acc", "test_acc", "test_macro_f1"):
            f.claim(type="summary", path=[model, fld], value=m[fld])
        cfg = m.get("config", {})
        per_class = m.get("per_class", [])
        finals = m.get("finals") or []
        if len(finals) > 1:  # the study trained its choice and the module's default; the better val won
            for x in finals:
                f.claim(type="final_candidate", model=model, variant=x["variant"], val_acc=x["val_acc"])
            best = max(finals, key=lambda x: x["val_acc"])
            f.claim(type="final_choice", model=model, variant=best["variant"])
            final_sentence = (
                "Two candidates were trained at full budget: " + "; ".join(
                    f"{x['variant']} (validation {pct(x['val_acc'])})" for x in finals)
                + f". The final model is the {best['variant']} one, the higher by validation accuracy.")
        else:
            final_sentence = ""
        out[model] = {
            "val_acc": pct(m["val_acc"]), "test_acc": pct(m["test_acc"]),
            "test_macro_f1": f"{m['test_macro_f1']:.4f}",
            "train_seconds": f"{m.get('train_seconds', float('nan')):.0f}",
            "train_minutes": f"{m.get('train_seconds', float('nan')) / 60:.1f}",
            "epochs_run": str(m.get("epochs_run", "–")),
            "n_params": f"{int(m['n_params']):,}" if m.get("n_params") is not None else "–",
            "config": config_rows(cfg),
            "per_class": [[c["class"], f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}"]
                          for c in per_class],
            "final_sentence": final_sentence,
        }
        if per_class:
            worst = min(per_class, key=lambda c: c["recall"])
            best = max(per_class, key=lambda c: c["recall"])
            out[model]["class_sentence"] = (f"Recall is highest for {best['class']} ({best['recall']:.3f}) and "
                                            f"lowest for {worst['class']} ({worst['recall']:.3f}).")
            f.claim(type="class_extreme", model=model, lowest=worst["class"], highest=best["class"])
        conf = m.get("confusion")
        if conf:
            cm = np.asarray(conf, dtype=float)
            off = cm.copy()
            np.fill_diagonal(off, 0)
            i, j = np.unravel_index(int(off.argmax()), off.shape)
            names = [c["class"] for c in per_class] if len(per_class) == cm.shape[0] else list(CLASS_NAMES)
            out[model]["confusion_sentence"] = (f"The most frequent confusion is {names[i]} predicted as "
                                                f"{names[j]} ({int(cm[i, j])} test images).")
            f.claim(type="confusion_max", model=model, true=int(i), pred=int(j), count=int(cm[i, j]))
        # Training hyperparameters in plain words for the "training setup" table.
        out[model]["hp"] = {k: fmt_value(cfg.get(k)) for k in
                            ("optimizer", "lr", "head_lr", "momentum", "weight_decay", "schedule",
                             "warmup_epochs", "epochs", "batch_size", "patience", "augment", "erase",
                             "label_smoothing", "tta", "standardize")
                            if k in cfg}
    diff = s["cnn"]["test_acc"] - s["mlp"]["test_acc"]
    out["cnn_minus_mlp"] = pts(diff)
    out["cnn_better"] = bool(diff > 0)
    f.claim(type="summary_order", better="cnn" if diff > 0 else "mlp")
    return out


# ------------------------------------------------------------------------------------------ CNN layers
def _cnn_module():
    try:
        sys.path.insert(0, str(REPO_DIR))
        import cnn_torch
        return cnn_torch
    except Exception as exc:  # noqa: BLE001 - the report says why the tables are missing
        return exc


def _list(v) -> list[int]:
    """A list-valued config field as saved in JSON (list) or in the CSVs (space- or comma-joined)."""
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    tokens = str(v).replace(",", " ").replace("[", " ").replace("]", " ").split()
    return [int(float(x)) for x in tokens if x.lower() not in ("none", "nan", "")]


def _backbone(cnn_torch, cfg: dict):
    filters = cfg.get("filters", "constant")
    if isinstance(filters, str) and filters not in ("constant", "double"):
        filters = _list(filters)
    return cnn_torch.CNNBackbone(filters, int(cfg["kernel_size"]), str(cfg["pool"]), str(cfg.get("init", "he")),
                                 1, _bool(cfg.get("batchnorm", False)), int(cfg.get("base_filters", 32)))


def _bool(v) -> bool:
    return str(v).strip().lower() in ("true", "1", "1.0", "yes")


def _head_params(feature_dim: int, hidden: list[int]) -> int:
    dims = [feature_dim, *hidden, 10]
    return sum(i * o + o for i, o in zip(dims[:-1], dims[1:]))


def cnn_layer_table(cfg: dict) -> dict:
    """Layers, output shapes and parameter counts of the chosen CNN, by instantiating cnn_torch's backbone
    and walking its modules with forward hooks (so the table is the real network, not a sketch), followed
    by the scratch MLP head's layers."""
    cnn_torch = _cnn_module()
    if isinstance(cnn_torch, Exception):
        return {"rows": [], "note": f"cnn_torch could not be imported ({type(cnn_torch).__name__}): no layer table."}
    import torch
    try:
        net = _backbone(cnn_torch, cfg)
    except Exception as exc:  # noqa: BLE001
        return {"rows": [], "note": f"the backbone could not be built from the saved config ({exc})."}
    rows, hooks = [], []

    def hook(mod, _inp, out):
        n = sum(p.numel() for p in mod.parameters(recurse=False))
        rows.append([type(mod).__name__ + _describe(mod), " × ".join(str(d) for d in tuple(out.shape)[1:]),
                     f"{n:,}"])

    for mod in net.modules():
        if len(list(mod.children())) == 0:
            hooks.append(mod.register_forward_hook(hook))
    net.eval()
    with torch.no_grad():
        feats = net(torch.zeros(1, 1, 28, 28))
    for h in hooks:
        h.remove()
    backbone_total = sum(p.numel() for p in net.parameters())
    hidden = _list(cfg.get("head_hidden", []))
    act = str(cfg.get("head_activation", "relu"))
    p_drop = float(cfg.get("head_dropout", 0.0) or 0.0)
    dims = [int(feats.shape[1]), *hidden, 10]
    for k, (i, o) in enumerate(zip(dims[:-1], dims[1:])):
        last = k == len(dims) - 2
        extra = "" if last else f", {act}" + (f", dropout {p_drop:g}" if p_drop else "")
        rows.append([f"MLP head (NumPy): linear {i}→{o}{extra}", str(o), f"{i * o + o:,}"])
    head_total = _head_params(dims[0], hidden)
    return {"rows": rows, "feature_dim": str(int(feats.shape[1])), "total": f"{backbone_total:,}",
            "head_total": f"{head_total:,}", "all_total": f"{backbone_total + head_total:,}", "note": ""}


def cnn_variant_table(runs: pd.DataFrame) -> list[list[str]]:
    """Every distinct architecture the CNN study trained: filters, kernel, pooling, feature size, backbone
    and head parameters, and multiply-adds of the convolutions per image."""
    cnn_torch = _cnn_module()
    if isinstance(cnn_torch, Exception) or runs.empty:
        return []
    cols = [c for c in ("filters", "base_filters", "kernel_size", "pool", "batchnorm", "head_hidden") if c in runs]
    out, seen = [], set()
    for _, r in runs.iterrows():
        cfg = {c: r[c] for c in cols}
        sig = tuple(str(cfg[c]) for c in cols)
        if sig in seen:
            continue
        seen.add(sig)
        try:
            net = _backbone(cnn_torch, cfg)
            hidden = _list(cfg.get("head_hidden", []))
        except Exception:  # noqa: BLE001 - an architecture the module no longer builds: leave it out
            continue
        out.append([str(r["study"]), str(r["variant"]), "-".join(str(c) for c in net.channels),
                    f"{net.kernel_size}", net.pool, str(net.feature_dim), f"{net.n_params:,}",
                    f"{_head_params(net.feature_dim, hidden):,}",
                    f"{net.conv_macs() / 1e6:.1f}" if hasattr(net, "conv_macs") else "–"])
    return out


def _describe(mod) -> str:
    import torch.nn as nn
    if isinstance(mod, nn.Conv2d):
        return f" {mod.in_channels}→{mod.out_channels}, {mod.kernel_size[0]}×{mod.kernel_size[1]}, pad {mod.padding[0]}"
    if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
        k = mod.kernel_size if isinstance(mod.kernel_size, int) else mod.kernel_size[0]
        return f" {k}×{k}"
    return ""


# ------------------------------------------------------------------------------------------ group
def load_group(path=GROUP_FILE) -> dict:
    """Group name, members, contributions. Placeholders (and a warning) until filled in; a sum other than
    100 stops the build."""
    path = Path(path)
    data = tomllib.loads(path.read_text()) if path.is_file() else {}
    members = data.get("member", []) or []
    name = str(data.get("group_name", "")).strip()
    filled = bool(name) and bool(members) and all(str(m.get("name", "")).strip() and str(m.get("email", "")).strip()
                                                  for m in members)
    contribs = [m.get("contribution") for m in members]
    given = [c for c in contribs if c is not None]
    if given:
        if len(given) != len(contribs):
            raise ReportError(f"{path}: every member needs a contribution once one is given")
        total = float(sum(given))
        if abs(total - 100) > 1e-6:
            raise ReportError(f"{path}: contributions add up to {total:g}%, not 100%")
    if not given:
        filled = False
    shown = []
    for i, m in enumerate(members or [{}], 1):
        shown.append({"name": str(m.get("name", "")).strip() or f"[Member {i} name]",
                      "email": str(m.get("email", "")).strip() or f"[member{i} email]",
                      "contribution": f"{m['contribution']:g}%" if m.get("contribution") is not None
                      else "[contribution %]"})
    return {"name": name or "[Group name]", "zip_name": name or "group-name", "members": shown,
            "placeholder": not filled}


# ------------------------------------------------------------------------------------------ figures
# The study's fixed figure names (run_experiments.py's docstring). All are required: the study always
# makes them, so a missing one means a broken or unfinished results folder.
FIGURES = {
    "samples": "class_samples.png",
    "curves": "learning_curves.png",
    "compare_mlp": "compare_mlp.png",
    "compare_cnn": "compare_cnn.png",
    "init_mlp_init": "init_stats_mlp_init.png",
    "init_mlp_activation": "init_stats_mlp_activation.png",
    "init_cnn_init": "init_stats_cnn_init.png",
    "confusion_mlp": "confusion_mlp.png",
    "confusion_cnn": "confusion_cnn.png",
    "per_class": "per_class_accuracy.png",
    "misclassified_mlp": "misclassified_mlp.png",
    "misclassified_cnn": "misclassified_cnn.png",
    "filters": "cnn_filters.png",
}
OPTIONAL_FIGURES = ()


def find_figures(results: dict) -> dict:
    fig_dir = results["dir"] / "figures"
    out = {}
    for key, name in FIGURES.items():
        if (fig_dir / name).is_file():
            out[key] = name
        elif key not in OPTIONAL_FIGURES:
            raise ReportError(f"figure {fig_dir / name} is missing: rebuild them with "
                              f"`python run_experiments.py --plots-only --results-dir {results['dir']}`")
    return out


# ------------------------------------------------------------------------------------------ facts + check
def make_facts(results: dict, group: dict | None = None) -> dict:
    f = Facts()
    figures = find_figures(results)
    s = results["summary"]
    st = s["study"]
    facts = {
        "group": group or load_group(),
        "meta": {"quick": bool(st.get("quick", False)), "seeds": ", ".join(str(x) for x in st.get("seeds", [])),
                 "n_seeds": str(len(st.get("seeds", []))), "device": fmt_value(st.get("device", "cpu")).replace(" × ", ", "),
                 "study_minutes": f"{float(st.get('seconds', 0)) / 60:.0f}",
                 "finished_at": str(st.get("finished_at", "")),
                 "versions": ", ".join(f"{k} {v}" for k, v in (st.get("versions") or {}).items()),
                 "grid_budget": [[str(k), fmt_value(v)] for k, v in (st.get("grid_budget") or {}).items()]
                 if isinstance(st.get("grid_budget"), dict) else [["grid", str(st.get("grid_budget", ""))]],
                 # a run shared by two comparisons (the incumbent level) has a row in each: count it once
                 "n_runs": str(pd.concat([results["mlp_runs"]["key"], results["cnn_runs"]["key"]]).nunique())},
        "figures": figures,
        "studies": make_study_facts(results, f, figures),
        "init": make_init_facts(results, f),
        "curves": make_curve_facts(results, f),
        "final": make_final_facts(results, f),
        "arch": cnn_layer_table(s["cnn"].get("config", {})),
        "arch_variants": cnn_variant_table(results["cnn_runs"]),
        "noise_z": f"{NOISE_Z:g}",
    }
    facts["studies_mlp"] = [x for x in facts["studies"] if x["model"] == "mlp"]
    facts["studies_cnn"] = [x for x in facts["studies"] if x["model"] == "cnn"]
    facts["claims"] = f.claims
    return facts


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= REL_TOL * max(1.0, abs(a), abs(b))


def _extreme(values: pd.Series, label: str, which) -> bool:
    """label holds the max (or min) of values, up to float rounding (exact ties may go either way)."""
    return label in values.index and _close(values[label], which(values))


def check_claims(results_dir, facts: dict) -> None:
    """Re-derive every claim in facts["claims"] from the files in results_dir (read afresh, computed
    here without the helpers that made the facts); raise ContradictionError listing each mismatch."""
    rd = Path(results_dir)
    csv = {}

    def table(name):
        if name not in csv:
            csv[name] = pd.read_csv(rd / name)
        return csv[name]

    summary = json.loads((rd / "summary.json").read_text())

    def ok_rows(file, study):
        df = table(file)
        df = df[df["study"].astype(str) == study]
        bad = df["diverged"].astype(str).str.lower().isin(["true", "1", "1.0"])
        return df[~bad]

    def means(file, study):
        g = ok_rows(file, study).groupby(df_variant(ok_rows(file, study)))["val_acc"]
        return g.mean()

    def df_variant(df):
        return df["variant"].astype(str)

    problems = []
    for c in facts["claims"]:
        t = c["type"]
        if t == "agg":
            df = ok_rows(c["file"], c["study"])
            v = df[df["variant"].astype(str) == c["variant"]][c["field"]].astype(float).to_numpy()
            got = {"mean": v.mean() if len(v) else float("nan"), "n": len(v),
                   "std": v.std(ddof=1) if len(v) > 1 else float("nan")}[c["stat"]]
            if not _close(got, c["value"]):
                problems.append(f"{c['study']}/{c['variant']}: {c['stat']} {c['field']} is {got}, report says {c['value']}")
        elif t == "winner":
            df = table(c["file"])
            df = df[df["study"].astype(str) == c["study"]]
            bad = df["diverged"].astype(str).str.lower().isin(["true", "1", "1.0"])
            clean = set(df["variant"].astype(str)) - set(df[bad]["variant"].astype(str))
            m = means(c["file"], c["study"])
            if clean & set(m.index):
                m = m[m.index.isin(clean)]
            if m.empty or not _extreme(m, c["variant"], max):
                problems.append(f"{c['study']}: best variant is {None if m.empty else m.idxmax()}, "
                                f"report says {c['variant']}")
        elif t == "gap_extremes":
            df = ok_rows(c["file"], c["study"])
            g = df.groupby(df_variant(df))
            gap = g["train_acc"].mean() - g["val_acc"].mean()
            if not (_extreme(gap, c["largest"], max) and _extreme(gap, c["smallest"], min)):
                problems.append(f"{c['study']}: largest/smallest train-val gap are {gap.idxmax()}/{gap.idxmin()}, "
                                f"report says {c['largest']}/{c['smallest']}")
        elif t == "noise":
            df = ok_rows(c["file"], c["study"])
            g = df.groupby(df_variant(df))["val_acc"]
            n, mean, var = g.count(), g.mean(), g.var(ddof=1)
            dof = (n[n > 1] - 1).sum()
            gap = mean.get(c["a"], float("nan")) - mean.get(c["b"], float("nan"))
            if dof > 0:
                sd = math.sqrt(((n[n > 1] - 1) * var[n > 1]).sum() / dof)
                beyond = bool(gap > NOISE_Z * sd * math.sqrt(1 / n[c["a"]] + 1 / n[c["b"]]))
            else:
                beyond = None
            if beyond != c["beyond"] or not _close(gap, c["gap"]):
                problems.append(f"{c['study']}: {c['a']} vs {c['b']} gap {gap} beyond noise={beyond}, "
                                f"report says gap {c['gap']} beyond noise={c['beyond']}")
        elif t in ("init", "init_max", "init_order"):
            st = table("init_stats.csv")
            st = st[st["model"] == c["model"]]
            if t == "init":
                v = st[(st["scheme"].astype(str) == c["scheme"]) & (st["layer"] == c["layer"])][c["field"]]
                got = float(v.iloc[0]) if len(v) else float("nan")
                if not _close(got, c["value"]):
                    problems.append(f"init {c['model']}/{c['scheme']} layer {c['layer']} {c['field']} is {got}, "
                                    f"report says {c['value']}")
            elif t == "init_max":
                got = float(st[st["scheme"].astype(str) == c["scheme"]][c["field"]].max())
                if not _close(got, c["value"]):
                    problems.append(f"init {c['model']}/{c['scheme']} max {c['field']} is {got}, report says {c['value']}")
            else:
                st = st[st["scheme"].astype(str).isin(c["schemes"])]
                first = st.sort_values("layer").groupby(st["scheme"].astype(str)).first()["grad_norm"]
                if not (_extreme(first, c["lowest"], min) and _extreme(first, c["highest"], max)):
                    problems.append(f"init {c['model']}: first-layer gradient lowest/highest are "
                                    f"{first.idxmin()}/{first.idxmax()}, report says {c['lowest']}/{c['highest']}")
        elif t in ("curve", "curve_best"):
            cv = table("curves.csv")
            g = cv[(cv["study"] == c["study"]) & (cv["key"].astype(str) == c["key"])]
            if t == "curve":
                v = g[g["epoch"] == c["epoch"]][c["field"]]
                got = float(v.iloc[0]) if len(v) else float("nan")
                if not _close(got, c["value"]) or int(g["epoch"].max()) != c["epoch"]:
                    problems.append(f"curves {c['study']} epoch {c['epoch']} {c['field']} is {got}, "
                                    f"report says {c['value']}")
            else:
                got = float(g["val_acc"].max())
                ep = int(g.loc[g["val_acc"].astype(float).idxmax(), "epoch"])
                if not _close(got, c["value"]) or ep != c["epoch"]:
                    problems.append(f"curves {c['study']}: best val {got} at epoch {ep}, report says "
                                    f"{c['value']} at {c['epoch']}")
        elif t == "summary":
            got = summary
            for k in c["path"]:
                got = got[k]
            if not _close(got, c["value"]):
                problems.append(f"summary {'.'.join(c['path'])} is {got}, report says {c['value']}")
        elif t in ("final_candidate", "final_choice"):
            finals = summary[c["model"]].get("finals") or []
            vals = pd.Series({x["variant"]: x["val_acc"] for x in finals}, dtype=float)
            if t == "final_candidate" and not (c["variant"] in vals.index and _close(vals[c["variant"]], c["val_acc"])):
                problems.append(f"{c['model']} final candidate {c['variant']} val_acc is "
                                f"{vals.get(c['variant'])}, report says {c['val_acc']}")
            if t == "final_choice" and not _extreme(vals, c["variant"], max):
                problems.append(f"{c['model']} best final candidate is {vals.idxmax()}, report says {c['variant']}")
        elif t == "summary_order":
            better = "cnn" if summary["cnn"]["test_acc"] > summary["mlp"]["test_acc"] else "mlp"
            if better != c["better"]:
                problems.append(f"the better test accuracy is the {better}'s, report says the {c['better']}'s")
        elif t == "class_extreme":
            pc = summary[c["model"]]["per_class"]
            recall = pd.Series({x["class"]: x["recall"] for x in pc})
            lo, hi = recall.idxmin(), recall.idxmax()
            if not (_extreme(recall, c["lowest"], min) and _extreme(recall, c["highest"], max)):
                problems.append(f"{c['model']} recall lowest/highest are {lo}/{hi}, report says "
                                f"{c['lowest']}/{c['highest']}")
        elif t == "confusion_max":
            cm = np.asarray(summary[c["model"]]["confusion"], dtype=float)
            np.fill_diagonal(cm, -1)
            i, j = np.unravel_index(int(cm.argmax()), cm.shape)
            if (int(i), int(j), int(cm[i, j])) != (c["true"], c["pred"], c["count"]):
                problems.append(f"{c['model']} largest confusion is {i}->{j} ({int(cm[i, j])}), report says "
                                f"{c['true']}->{c['pred']} ({c['count']})")
        else:
            problems.append(f"unknown claim type {t}")
    if problems:
        raise ContradictionError(f"{len(problems)} statement(s) contradict {rd}: " + "; ".join(problems[:5]))


# ------------------------------------------------------------------------------------------ build
def compile_pdf(facts: dict, figures_dir: Path, out_pdf: Path, fmt: str = "pdf") -> None:
    """Compile in a scratch folder holding the source, facts.json and the figures (Typst reads files only
    under its root). fmt="png" writes one image per page, out_pdf being a "{p}" template (for previews)."""
    import typst
    with tempfile.TemporaryDirectory(prefix="report-build-") as tmp:
        tmp = Path(tmp)
        shutil.copy(TYP_SOURCE, tmp / "report.typ")
        shutil.copy(BIB_SOURCE, tmp / "references.bib")
        (tmp / "facts.json").write_text(json.dumps(facts, indent=1, default=str))
        (tmp / "figures").mkdir()
        for name in set(facts["figures"].values()):
            shutil.copy(figures_dir / name, tmp / "figures" / name)
        out_pdf.parent.mkdir(parents=True, exist_ok=True)
        try:
            typst.compile(str(tmp / "report.typ"), output=str(out_pdf), root=str(tmp), format=fmt,
                          **({"ppi": 60} if fmt == "png" else {}))
        except Exception as exc:  # typst errors are long; the first line says where
            raise ReportError(f"typst could not compile report.typ: {str(exc).strip().splitlines()[0]}") from exc


def default_pdf(results_dir) -> Path:
    """report/report.pdf for the repository's results/, else <results_dir>/report.pdf, so that a quick or
    test study never overwrites the committed report."""
    rd = Path(results_dir).resolve()
    return REPORT_DIR / "report.pdf" if rd == (REPO_DIR / "results").resolve() else rd / "report.pdf"


def build_report(results_dir="results", out_pdf=None, group_file=GROUP_FILE) -> Path:
    """Read results_dir, compute the facts, check them against the CSVs, compile the PDF; return its path.

    out_pdf None: report/report.pdf when results_dir is the repository's results/, else
    <results_dir>/report.pdf."""
    results_dir = Path(results_dir)
    out_pdf = Path(out_pdf) if out_pdf is not None else default_pdf(results_dir)
    group = load_group(group_file)
    if group["placeholder"]:
        print(f"warning: {Path(group_file)} is not filled in (group name, member names, e-mails, "
              f"contributions): the report shows placeholders", file=sys.stderr)
    results = load_results(results_dir)
    facts = make_facts(results, group)
    check_claims(results_dir, facts)
    if facts["meta"]["quick"]:
        print("warning: these are --quick results (tiny subset, 1-2 epochs): the numbers are not the study's",
              file=sys.stderr)
    compile_pdf(facts, results_dir / "figures", out_pdf)
    return out_pdf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Build the PDF report from saved study results.")
    p.add_argument("--results-dir", default="results", help="the study's output folder (default: results)")
    p.add_argument("--out", default=None, help="PDF to write (default: report/report.pdf for results/, "
                                               "else <results-dir>/report.pdf)")
    p.add_argument("--group-file", default=str(GROUP_FILE), help="group details (default: report/group.toml)")
    args = p.parse_args(argv)
    try:
        out = build_report(args.results_dir, args.out, args.group_file)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
