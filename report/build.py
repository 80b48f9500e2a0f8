"""Build report/report.pdf from the study's saved results (assignment Q4).

    python -m report.build                                    # results/ -> report/report.pdf
    python -m report.build --results-dir results-quick --out /tmp/r.pdf --facts /tmp/facts.json

The prose is written by hand in report/report.typ; this module supplies its numbers and checks its claims.
It reads results/ (summary.json, manifest.json, the run records, init_stats.csv, figures/) and computes named
facts, each a raw value (facts.json "n", for claims) and its printed form ("v", for the text): report.typ
prints `#v("cnn.ece")` and types no number itself. Names, dotted (--facts lists them all):

    <stage>.winner, .incumbent (display names; _id: raw), .mdd, .sd, .dof, .n, .gain, .changed, .edge,
        .n_capped, .means, .train_accs (lists in the stage's order)
    <stage>.<level>.mean, .diff (to the winner), .ci_lo, .ci_hi, .clear (interval excludes 0), .behind,
        .vs_start (mean - the start level's mean), .train_acc, .fit_gap (train - val), .macs_ratio, .time_ratio,
        .n_params, .feature_dim, .eligible, .contrast, .capped; the same under the roles .win, .runner (best
        other eligible level), .start, .best and .worst. A level's name is slugged: "he, no BN" -> he_no_bn, "0.003" -> 0_003.
    mlp|cnn.test_acc, .test_mean, .test_std, .val_mean, .wilson_lo/_hi, .kept, .ranking_held,
        .chain_minus_start(_lo/_hi), .grid_gain_sum, .cand.<chain|start|largest_single_change>.val_mean/.diff,
        .largest_change, .curve.*, .ece, .wrong_confident_share, .worst_class, .cfg.<setting>;
        start.mlp|cnn.<setting>
    heads.<linear|frozen|joint>.val_mean, heads.scratch_minus_linear(_lo/_hi), heads.joint_minus_frozen, ...
    init.<scheme>.<bn|nobn>.*, init.<bn|nobn>.grad_spread/act_spread; mcnemar.<a>_vs_<b>.*; design.*;
        sweep.*; optim.*; baseline.*; final.cnn_minus_mlp; gradcheck.*; calib.n_bins, calib.confident

How a fact prints follows the last part of its name (FORMATS): accuracies as "90.12%", differences in points
("+0.35"), ratios as "1.56×".

A claim is declared in report.typ on a comment line directly above its sentence:

    // claim: mlp_dropout.winner_id == "0.3" and mlp_dropout.runner.ci_hi < 0

a Python expression over fact names (plus rising, falling, inner_peak, abs, min, max, all, any, len). Each is
evaluated against the results before the PDF is written; one that is false, cannot be evaluated, or names a
fact these results do not have stops the build with one line naming the sentence (for --quick results it is
a warning: their numbers are not the study's). The gradient checks run here (report/gradcheck.py) into
<results>/gradcheck.json.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd

import cli
import plots
from plots import display_name as name
import run_experiments as rx
from cli import ArgumentParser, atomic_write, path_arg
from preprocessing import CLASS_NAMES, IMAGE_SIDE, INPUT_DIM, NUM_CLASSES
from study_results import mean, paired_difference, wilson_interval

REPORT_DIR = Path(__file__).resolve().parent
REPO_DIR = REPORT_DIR.parent
TYP_SOURCE = REPORT_DIR / "report.typ"
BIB_SOURCE = REPORT_DIR / "references.bib"
GROUP_FILE = REPORT_DIR / "group.toml"  # the group's name, members and contributions

REBUILD = "rebuild it with `python run_experiments.py --plots-only`"
MAX_BODY_PAGES, MAX_PAGES = 12, 16  # the assignment's report: pages before the appendix, and in all
# Published results for context: the benchmark table of the dataset's README (zalandoresearch/fashion-mnist,
# commit 02cf067), as submitted there (not re-run by its authors or by us).
BASELINES = {"mlp": ("MLP 256-128-64", "none", 0.900),
             "cnn2": ("2 conv layers with max pooling (Keras)", "none", 0.876),
             "cnn3": ("3 conv layers + pooling + BatchNorm", "none", 0.903),
             "cnn_small": ("2 conv layers, under 100k parameters", "none", 0.925),
             "cnn_fc": ("3 conv + pooling and 2 FC + dropout", "none", 0.926),
             "resnet18": ("ResNet18", "normalisation, flips, translation, rotation", 0.949),
             "human": ("human performance (crowd-sourced, 1,000 images)", "–", 0.835)}
CANDIDATE_WORDS = {"chain": "the combination of the stage winners", "start": "the start configuration",
                   "largest single change": "the largest single change"}


class ReportError(cli.UserError):
    """One-line, user-facing reason why the report cannot be built."""


# ------------------------------------------------------------------------------------------ facts
def slug(v) -> str:
    """A level's name in a fact name: 'he, no BN' -> 'he_no_bn', '0.003' -> '0_003'."""
    return re.sub(r"[^a-z0-9]+", "_", str(v).lower()).strip("_")


# How a fact prints follows its name's last part: accuracies as percentages, differences in points (signed),
# ratios with ×; other numbers with 2 significant digits or, if whole, with thousands separators.
FORMATS = {"pct": "mean train_acc val_mean test_mean test_acc val_acc wilson_lo wilson_hi val_best train_last best_val",
           "spts": "diff ci_lo ci_hi fit_gap gain grid_gain_sum vs_start", "pts": "mdd sd behind test_std ece tie",
           "pct0": "val_loss_rise wrong_confident_share dead_max mean_conf confident", "pct1": "worst_recall",
           "sci": "grad_first grad_last worst_fd worst_torch", "f3": "macro_f1 val_loss_min", "min": "minutes",
           "s": "seconds"}
KIND = {k: kind for kind, keys in FORMATS.items() for k in keys.split()}


def kind_of(key: str) -> str:
    last = key.rsplit(".", 1)[-1]
    return KIND.get(last) or ("pct1" if key.startswith("baseline.") else "pts" if last.endswith("_abs") else
                              "spts" if "_minus_" in last or last.endswith(("_lo", "_hi")) else
                              "x" if last.endswith(("ratio", "spread")) else "")


def fmt(x, kind: str) -> str:
    """The printed form of a fact. pct: accuracy; pts: a difference in points; spts: signed; x: a ratio."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (bool, str, list, tuple)):
        return ("yes" if x else "no") if isinstance(x, bool) else x if isinstance(x, str) else \
            ", ".join(fmt(e, kind) for e in x)
    f = {"pct": lambda: f"{100 * x:.2f}%", "pct1": lambda: f"{100 * x:.1f}%", "pct0": lambda: f"{100 * x:.0f}%",
         "pts": lambda: f"{100 * x:.2f}", "spts": lambda: f"{100 * x:+.2f}".replace("-", "−"),
         "x": lambda: f"{x:,.0f}×" if x >= 100 else f"{x:.1f}×" if x >= 10 else f"{x:.2{'f' if x >= 0.1 else 'g'}}×",
         "s": lambda: f"{x:.0f} s", "min": lambda: f"{x / 60:.1f}", "f3": lambda: f"{x:.3f}",
         "sci": lambda: re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", f"{x:.1e}")}.get(kind)
    return f() if f else f"{int(x):,}" if float(x).is_integer() else f"{x:.2g}"


class Facts:
    """Named facts: raw values (n, for claims) and their printed forms (v, for the text)."""

    def __init__(self):
        self.n, self.v = {}, {}

    def put(self, prefix: str, **values) -> None:
        """put("mlp", test_acc=0.9) -> fact "mlp.test_acc", printed "90.00%" (FORMATS)."""
        for k, x in values.items():
            x = x.item() if isinstance(x, np.generic) else x
            self.n[f"{prefix}.{k}"], self.v[f"{prefix}.{k}"] = x, fmt(x, kind_of(f"{prefix}.{k}"))

    def interval(self, prefix: str, d: dict | None) -> str:
        """A paired difference {diff, ci}: facts prefix (signed points), prefix_lo, prefix_hi; its '[lo, hi]'."""
        (lo, hi), head, last = (d or {}).get("ci") or (None, None), *prefix.rsplit(".", 1)
        self.put(head, **{last: (d or {}).get("diff"), f"{last}_lo": lo, f"{last}_hi": hi})
        return "–" if lo is None else f"[{fmt(lo, 'spts')}, {fmt(hi, 'spts')}]"


def _record(rd: Path, key) -> dict:
    try:
        return dict(json.loads((rd / "runs" / f"{key}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def stage_facts(f: Facts, p: str, st: dict, rd: Path, manifest: dict) -> list[list[str]]:
    """Facts of stage p and its table rows: p.winner, p.mdd, ...; per level p.<slug>.mean, .diff, .ci_lo, ...;
    the same under the roles p.win, p.runner (best other eligible level), p.start, p.best, p.worst."""
    rows_m, table = st.get("rows") or {}, {str(r["variant"]): r for r in st.get("table") or []}
    levels = [str(v) for v in st.get("levels") or rows_m]
    contrast, capped = {str(c) for c in st.get("contrast") or []}, {str(c) for c in st.get("macs_capped") or []}
    keys: dict[str, list[str]] = {}  # each level's runs
    for r in manifest.get("runs", []):
        if r.get("study") == p:
            keys.setdefault(str(r["variant"]), []).append(r["key"])
    win, start = str(st.get("winner")), str(st.get("incumbent"))
    f.put(p, title=rx.STAGE[p].title if p in rx.STAGE else p, winner=name(p, win), winner_id=win,
          incumbent=name(p, start), incumbent_id=start, changed=win != start, edge=st.get("edge"), mdd=st.get("mdd"),
          sd=st.get("sd"), dof=st.get("dof"), n=max((r.get("n") or 0 for r in rows_m.values()), default=0),
          n_capped=len(capped), n_levels=len(levels) - len(contrast), gain=st.get("gain"))
    out, base = [], rows_m.get(start, {}).get("mean")
    for v in levels:
        r, t, q = rows_m.get(v, {}), table.get(v, {}), f"{p}.{slug(v)}"
        runs = [_record(rd, k) for k in keys.get(v, [])] or [{}]
        mean, train, (lo, hi) = r.get("mean"), t.get("train_acc"), r.get("ci") or (None, None)
        f.put(q, name=name(p, v), id=v, clear=lo is not None and (lo > 0 or hi < 0), eligible=bool(r.get("eligible")),
              contrast=v in contrast, capped=v in capped, mean=mean, train_acc=train, diff=r.get("diff"), ci_lo=lo,
              ci_hi=hi, fit_gap=None if train is None or mean is None else train - mean,
              behind=None if r.get("diff") is None else -r["diff"],
              vs_start=None if None in (mean, base) else mean - base, macs_ratio=(st.get("macs_ratio") or {}).get(v),
              time_ratio=(st.get("time_ratio") or {}).get(v), n=r.get("n"), n_params=t.get("n_params"),
              macs=t.get("macs"), feature_dim=runs[-1].get("feature_dim"), seconds=t.get("seconds"))
        # frozen CNN runs, at the backbone phase's last epoch: the live network's fit (its lowest over seeds) and
        # its weight average's validation accuracy (the highest), which is what gets validated and kept
        ends = [b[-1] for run in runs if (b := [h for h in run.get("history") or [] if h.get("phase") == "backbone"])]
        if ends:
            f.put(f"{q}.backbone_end", train_acc=min(h["train_acc"] for h in ends),
                  val_acc=max(h["val_acc"] for h in ends))
        marks = ("✓" if v == win else "") + ("†" if v in contrast - capped else "") + \
            ("‡" if v in capped else "") + ("\u00a0(start)" if v == start else "")
        out.append([f"{name(p, v)} {marks}".strip(), f.v[f"{q}.mean"], f.v[f"{q}.diff"],
                    "–" if lo is None else f"[{fmt(lo, 'spts')}, {fmt(hi, 'spts')}]", f.v[f"{q}.train_acc"],
                    f.v[f"{q}.macs_ratio"], f.v[f"{q}.time_ratio"]])
    ok = sorted((v for v in levels if rows_m.get(v, {}).get("eligible") and rows_m[v].get("mean") is not None),
                key=lambda v: -rows_m[v]["mean"])
    roles = {"win": win, "start": start, "runner": next((v for v in ok if v != win), None),
             "best": ok[0] if ok else None, "worst": ok[-1] if ok else None}
    for role, v in roles.items():
        src = f"{p}.{slug(v)}."
        for k in [k for k in f.n if v is not None and k.startswith(src)]:
            f.n[f"{p}.{role}.{k[len(src):]}"], f.v[f"{p}.{role}.{k[len(src):]}"] = f.n[k], f.v[k]
    f.n[f"{p}.means"] = [rows_m.get(v, {}).get("mean") for v in levels if v not in contrast]
    f.n[f"{p}.train_accs"] = [table.get(v, {}).get("train_acc") for v in levels if v not in contrast]
    return out


def final_facts(f: Facts, m: str, s: dict, rd: Path) -> list[list[str]]:
    """The kept final model of track m (m.test_acc, ...), its full-budget candidates (m.cand.<name>.*),
    chain against start (m.chain_minus_start), its curves, calibration and classes; the candidates' rows."""
    fm = s[m]
    lo, hi = fm.get("test_acc_wilson95") or (None, None)
    f.put(m, test_acc=fm["test_acc"], val_acc=fm["val_acc"], test_mean=fm.get("test_acc_mean"),
          val_mean=fm.get("val_acc_mean"), wilson_lo=lo, wilson_hi=hi, n_params=fm.get("n_params"), macs=fm.get("macs"),
          epochs=fm.get("epochs_run"), n_seeds=len(fm.get("seeds") or []), precision=name("", fm.get("precision")),
          kept=CANDIDATE_WORDS.get(fm.get("kept"), fm.get("kept")), kept_id=fm.get("kept"),
          test_std=fm.get("test_acc_std"), macro_f1=fm.get("test_macro_f1"), minutes=fm.get("train_seconds"))
    cands, rows = {c["name"]: c for c in fm.get("candidates") or []}, []
    for cname, c in cands.items():
        q = f"{m}.cand.{slug(cname)}"
        f.put(q, val_mean=c.get("val_acc_mean"), test_mean=c.get("test_acc_mean"),
              same_as=(fm.get("same") or {}).get(cname, cname), minutes=mean([r.get("seconds") for r in c["seeds"]]))
        interval = f.interval(f"{q}.diff", c.get("val_diff_to_kept"))
        rows.append([m.upper(), CANDIDATE_WORDS.get(cname, cname) + (" ✓" if cname == fm.get("kept") else ""),
                     str(len(c.get("seeds") or [])), f.v[f"{q}.val_mean"], f.v[f"{q}.diff"], interval,
                     f.v[f"{q}.test_mean"]])
    if "chain" in cands and "start" in cands:
        d = paired_difference(cands["chain"]["seeds"], cands["start"]["seeds"]) or {}
        f.interval(f"{m}.chain_minus_start", d)
        f.put(m, ranking_held=d.get("diff") is not None and d["diff"] >= 0)
    stages = {k: st for k, st in s["stages"].items() if st.get("model") == m and k != "cnn_ablation"}
    f.put(m, grid_gain_sum=sum(st.get("gain") or 0 for st in stages.values()),
          largest_change=rx.STAGE[max(stages, key=lambda k: stages[k].get("gain") or 0)].title if stages else None)
    rec = _record(rd, fm["key"])
    if hist := rec.get("history"):
        checked = [h for h in hist if h["val_acc"] is not None]  # a CNN's first epochs are not validated
        best, last, low = max(checked, key=lambda h: h["val_acc"]), hist[-1], min(checked, key=lambda h: h["val_loss"])
        f.put(f"{m}.curve", best_epoch=best["epoch"], epochs=last["epoch"], val_loss_min_epoch=low["epoch"],
              val_from=checked[0]["epoch"],
              head_start=next((h["epoch"] for a, h in zip(hist, hist[1:]) if h.get("phase") != a.get("phase")), None),
              val_best=best["val_acc"], train_last=last["train_acc"], fit_gap=last["train_acc"] - last["val_acc"],
              val_loss_min=low["val_loss"], val_loss_rise=last["val_loss"] / low["val_loss"] - 1)
    if all(rec.get(k) for k in ("test_prob_max", "test_pred", "test_true")):  # calibration, the diagram's bins
        prob = np.asarray(rec["test_prob_max"], float)
        correct = np.asarray(rec["test_pred"]) == np.asarray(rec["test_true"])
        bins, wrong = plots.calibration_bins(prob, correct), ~correct
        f.put(m, ece=sum(b["n"] * abs(b["acc"] - b["conf"]) for b in bins) / len(prob), mean_conf=prob.mean(),
              n_wrong=wrong.sum(), wrong_confident=(wrong & (prob >= plots.CONFIDENT)).sum(),
              wrong_confident_share=(wrong & (prob >= plots.CONFIDENT)).sum() / max(wrong.sum(), 1))
    if fm.get("per_class") and fm.get("confusion"):
        worst, cm = min(fm["per_class"], key=lambda c: c["recall"]), np.asarray(fm["confusion"], float)
        np.fill_diagonal(cm, -1)
        i, j = np.unravel_index(int(cm.argmax()), cm.shape)
        f.put(m, worst_class=worst["class"], worst_recall=worst["recall"], confusion_true=CLASS_NAMES[i],
              confusion_pred=CLASS_NAMES[j], confusion_count=int(cm[i, j]))
    return rows


def heads_facts(f: Facts, heads: dict | None) -> list[list[str]]:
    """Q3d at full budget: heads.<linear|frozen|joint>.val_mean, ...; paired heads.scratch_minus_linear, ..."""
    if not heads:
        return []
    frozen, joint, rows = heads.get("frozen") or [], heads.get("joint") or [], []
    linear = [{"seed": r["seed"], "val_acc": r.get("linear_val_acc")} for r in frozen]
    for mode, rs, secs, words in (
            ("linear", linear, [r.get("backbone_seconds") for r in frozen], "backbone's linear head"),
            ("frozen", frozen, [r.get("seconds") for r in frozen], "scratch MLP on frozen features"),
            ("joint", joint, [r.get("seconds") for r in joint], "joint training through the scratch MLP")):
        f.put(f"heads.{mode}", val_mean=mean([r.get("val_acc") for r in rs]), n=len(rs),
              test_mean=mean([r.get("test_acc") for r in rs]), seconds=mean(secs))
        rows.append([words, str(len(rs)), *(f.v[f"heads.{mode}.{k}"] for k in ("val_mean", "test_mean", "seconds"))])
    for key, a, b in (("scratch_minus_linear", frozen, linear), ("joint_minus_frozen", joint, frozen),
                      ("joint_minus_linear", joint, linear)):
        f.interval(f"heads.{key}", paired_difference(a, b))
    f.put("heads", joint_time_ratio=(f.n["heads.joint.seconds"] or 0) / (f.n["heads.frozen.seconds"] or math.nan))
    return rows


def init_facts(f: Facts, rd: Path) -> list[list[str]]:
    """init.<scheme>.<bn|nobn>.act_first, act_last, grad_first, grad_last, dead_max (init_stats.csv, CNN), and
    across schemes init.<bn|nobn>.grad_spread (first layer) and act_spread (last layer): max / min."""
    if not (rd / "init_stats.csv").is_file():
        return []
    st = pd.read_csv(rd / "init_stats.csv")
    st, rows, spread = st[st["model"] == "cnn"], [], {}
    for (scheme, bn), g in st.groupby([st["scheme"].astype(str), st["batchnorm"].astype(str).str.lower() == "true"],
                                      sort=False):
        g, q = g.sort_values("layer"), f"init.{slug(scheme)}.{'bn' if bn else 'nobn'}"
        first, last = g.iloc[0], g.iloc[-1]
        f.put(q, act_first=first["act_std"], act_last=last["act_std"], dead_max=g["dead_frac"].max(),
              grad_first=first["grad_norm"], grad_last=last["grad_norm"])
        spread.setdefault(bn, []).append((float(first["grad_norm"]), float(last["act_std"])))
        rows.append([name("cnn_init", scheme), "yes" if bn else "no",
                     *(f.v[f"{q}.{k}"] for k in ("act_first", "act_last", "grad_first", "grad_last", "dead_max"))])
    for bn, xs in spread.items():
        g, a = np.array(xs).T
        f.put(f"init.{'bn' if bn else 'nobn'}", grad_spread=g.max() / g.min() if g.min() > 0 else None,
              act_spread=a.max() / a.min() if a.min() > 0 else None)
    return rows


def design_facts(f: Facts, s: dict, manifest: dict, rd: Path) -> None:
    """design.* (runs, budgets, seeds, the rule's tie and cap), sweep.* (the recipe sweep), optim.* (the MLP
    optimisers' settings), baseline.* (published results)."""
    st, rec = s["study"], _record(rd, s["mlp"]["key"])
    f.put("design", quick=st.get("plan") == "quick", n_runs=st.get("n_runs"), n_diverged=st.get("n_diverged"),
          versions=", ".join(f"{k} {v}" for k, v in (st.get("versions") or {}).items() if k != "platform"),
          train_hours=(st.get("seconds") or 0) / 3600, macs_cap=manifest.get("macs_cap"), tie=manifest.get("tie"),
          **{k: rec.get(k) for k in ("n_train", "n_val", "n_test")},
          **{f"{m}_seeds": len(seeds) for m, seeds in (manifest.get("seeds") or {}).items()})
    for k, b in (st.get("grid_budget") or {}).items():
        f.put(f"design.{k}", **(b if isinstance(b, dict) else {}))
    if (sweep := rd / "cnn_recipe_sweep_cpu.jsonl").is_file():
        df = pd.DataFrame([json.loads(x) for x in sweep.read_text().splitlines() if x.strip()])
        df["val"] = [r["val_tta" if r["config"]["tta"] else "val_plain"] for r in df.to_dict("records")]  # as run
        means = df.groupby("name")["val"].mean()
        f.put("sweep", n_recipes=len(means), n_runs=len(df), best=str(means.idxmax()), best_val=float(means.max()))
        f.put("sweep.e10", val_mean=float(means.get("E10", np.nan)))  # the same ten epochs, no averaging or mirrors
    if (timing := rd / "cnn_default_timing.jsonl").is_file():  # `time python cnn_torch.py` with the start's recipe
        f.put("sweep.default", minutes=float(np.median([json.loads(x)["wall_seconds"]
                                                        for x in timing.read_text().splitlines()])))
    for opt, cfg in rx.MLP_OPTIMIZERS.items():
        f.put(f"optim.{opt}", **{k: x for k, x in cfg.items() if k != "optimizer"})
    f.put("baseline", **{k: acc for k, (_, _, acc) in BASELINES.items()})


def mcnemar_facts(f: Facts, s: dict) -> list[list[str]]:
    """mcnemar.<a>_vs_<b>.p, only_a (a right, b wrong), only_b, disagree_one_right, significant."""
    rows = []
    for t in s.get("mcnemar") or []:
        q = f"mcnemar.{slug(t['a'])}_vs_{slug(t['b'])}"
        f.put(q, p=t.get("p_value"), only_a=t["n10"], only_b=t["n01"], disagree_one_right=t["n10"] + t["n01"],
              significant=t.get("p_value") is not None and t["p_value"] < 0.05)
        rows.append([*(str(t[k]).replace("chain", "stage winners") for k in ("a", "b")), fmt(t.get("acc_a"), "pct"),
                     fmt(t.get("acc_b"), "pct"), str(t["n10"]), str(t["n01"]), f.v[f"{q}.p"]])
    return rows


# ------------------------------------------------------------------------------------------ tables
def _value(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) or "none"
    return f"{v:g}" if isinstance(v, float) else name("", v) if isinstance(v, str) else str(v)


def config_rows(*cfgs: dict) -> list[list[str]]:
    """One row per setting: its key (report.typ words it) and its value in each config."""
    keys = dict.fromkeys(k for c in cfgs for k in c if k not in ("seed", "subset", "device", "base_filters"))
    return [[k, *(_value(c[k]) if k in c else "–" for c in cfgs)] for k in keys]


def mlp_layer_rows(cfg: dict) -> list[list[str]]:
    hidden, p, d = cfg.get("hidden") or [], cfg.get("dropout") or 0, INPUT_DIM
    rows = [["input (flattened image)", str(INPUT_DIM), "0"]]
    for i, h in enumerate(hidden, 1):
        rows += [[f"linear {i}: {d} → {h}", str(h), f"{d * h + h:,}"],
                 [name("", cfg.get("activation")) + (f", dropout {p:g}" if p else ""), str(h), "0"]]
        d = h
    c = NUM_CLASSES
    return rows + [[f"linear {len(hidden) + 1}: {d} → {c} (logits)", str(c), f"{d * c + c:,}"],
                   ["softmax + cross-entropy (fused)", str(c), "0"]]


LAYER_WORDS = {"MaxPool2d": "max pooling 2×2", "AvgPool2d": "average pooling 2×2", "BatchNorm2d": "BatchNorm",
               "AdaptiveAvgPool2d": "global average pooling", "Flatten": "flatten"}


def cnn_layer_rows(cfg: dict) -> list[list[str]]:
    """The final CNN's layers: cnn_torch's backbone built from the saved config, one image run through it."""
    import dataclasses
    import torch
    import cnn_torch
    known = {fl.name for fl in dataclasses.fields(cnn_torch.CNNConfig)}
    net, rows = cnn_torch.build_backbone(cnn_torch.CNNConfig(**{k: v for k, v in cfg.items() if k in known})), []

    def hook(m, _, out):  # each layer as the image passes: what it is, its output's shape, its parameters
        what = (f"convolution {m.in_channels} → {m.out_channels}, {m.kernel_size[0]}×{m.kernel_size[1]}"
                if isinstance(m, torch.nn.Conv2d) else LAYER_WORDS.get(type(m).__name__, type(m).__name__))
        rows.append([what, " × ".join(map(str, out.shape[1:])), f"{sum(p.numel() for p in m.parameters()):,}"])
    for m in [m for m in net.modules() if not list(m.children())]:
        m.register_forward_hook(hook)
    with torch.no_grad():
        dims = [int(net.eval()(torch.zeros(1, 1, IMAGE_SIDE, IMAGE_SIDE)).shape[1]), *cfg.get("head_hidden", []),
                NUM_CLASSES]
    act = name("", cfg.get("head_activation"))
    return rows + [[f"scratch MLP head: linear {i} → {o}" + (f", {act}" if o != NUM_CLASSES else ""), str(o),
                    f"{i * o + o:,}"] for i, o in zip(dims[:-1], dims[1:])]


def gradcheck_facts(f: Facts, rd: Path) -> list[list[str]]:
    """gradcheck.worst_fd, worst_torch, shape, n_layers; saved to <results>/gradcheck.json; the table rows."""
    from report import gradcheck
    data = gradcheck.run()
    atomic_write(rd / "gradcheck.json", json.dumps(data, indent=1).encode())
    cell, sh = {(r["activation"], r["layer"]): r for r in data["rows"]}, data["shape"]
    layers = sorted({r["layer"] for r in data["rows"]})
    f.put("gradcheck", worst_fd=max(r["fd"] for r in data["rows"]), worst_torch=max(r["torch"] for r in data["rows"]),
          n_layers=len(layers), shape=f"{sh['input']} inputs, hidden widths {', '.join(map(str, sh['hidden']))}, "
                            f"{sh['classes']} classes, a batch of {sh['batch']}")
    return [[name("", a)] + [f"{fmt(cell[a, k]['fd'], 'sci')} / {fmt(cell[a, k]['torch'], 'sci')}" for k in layers]
            for a in dict.fromkeys(r["activation"] for r in data["rows"])]


# ------------------------------------------------------------------------------------------ all facts
def budget_facts(f: Facts, rd: Path) -> list[list[str]]:
    """benchmarks/grid_budget.py's check, where it ran (results/grid_budget.json): per stage s the display names
    budget.<s>.grid_winner and .full_winner, .passes, and .diff (at full budget, the grid winner minus the full
    budget's, points) with .diff_lo / .diff_hi; budget.n and budget.n_passed."""
    factors, rows = _json(rd / "grid_budget.json")["factors"] if (rd / "grid_budget.json").is_file() else [], []
    for v in factors:
        p, sid, levels = f"budget.{v['factor']}", v["factor"], list(dict.fromkeys(k.rsplit(" ", 1)[0] for k in v["means"]))
        f.put(p, grid_winner=name(sid, v["grid_winner"]), full_winner=name(sid, v["full_winner"]), passes=v["passes"])
        rows.append([rx.STAGE[sid].title, " vs ".join(name(sid, lv) for lv in levels), *(" / ".join(
            fmt(v["means"][f"{lv} {b}"], "pct") for lv in levels) for b in ("grid", "full")),
            f"{fmt(v['diff'], 'spts')} {f.interval(p + '.diff', v)}", f.v[f"{p}.passes"]])
    f.put("budget", n=len(factors), n_passed=sum(v["passes"] for v in factors))
    return rows


def make_facts(results: dict, group: dict) -> dict:
    """facts.json: {"n": raw facts, "v": printed facts, "tables": rows, "figures", "group", "stages"}."""
    rd, s, man, f = results["dir"], results["summary"], results["manifest"], Facts()
    figures, missing = find_figures(rd)
    design_facts(f, s, man, rd)
    starts = {f"start.{m}": c for m, c in (man.get("start") or {}).items()}  # start.mlp.lr, cnn.cfg.epochs, ...
    for prefix, cfg in {**starts, "mlp.cfg": s["mlp"]["config"], "cnn.cfg": s["cnn"]["config"]}.items():
        f.n.update({f"{prefix}.{k}": x for k, x in cfg.items()})
        f.v.update({f"{prefix}.{k}": _value(x) for k, x in cfg.items()})
    stages = {k: {**man["stages"].get(k, {}), **st} for k, st in s["stages"].items()}
    tables = {"stage": {k: stage_facts(f, k, st, rd, man) for k, st in stages.items()},
              "candidates": [r for m in ("mlp", "cnn") for r in final_facts(f, m, s, rd)],
              "heads": heads_facts(f, s.get("heads")), "init": init_facts(f, rd), "mcnemar": mcnemar_facts(f, s),
              "budget": budget_facts(f, rd),
              "gradcheck": gradcheck_facts(f, rd), "mlp_layers": mlp_layer_rows(s["mlp"]["config"]),
              "cnn_layers": cnn_layer_rows(s["cnn"]["config"]),
              "config": config_rows(*(c for m in ("mlp", "cnn") for c in (starts.get(f"start.{m}", {}),
                                                                             s[m]["config"]))),
              "baselines": [[label, prep, fmt(acc, "pct1")] for label, prep, acc in BASELINES.values()]}
    diff = f.n["cnn.test_mean"] - f.n["mlp.test_mean"]
    f.put("final", cnn_minus_mlp=diff, cnn_minus_mlp_abs=abs(diff))
    f.put("calib", n_bins=plots.N_BINS, confident=plots.CONFIDENT)  # the reliability diagram's bins, threshold
    return {"v": f.v, "n": f.n, "tables": tables, "figures": figures, "missing_figures": missing, "group": group,
            "stages": list(stages)}


# ------------------------------------------------------------------------------------------ claims
NAME = re.compile(r"""("[^"]*"|'[^']*')|\b([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+)\b""")
HELPERS = {"abs": abs, "min": min, "max": max, "all": all, "any": any, "len": len,
           "rising": lambda xs: all(a < b for a, b in zip(xs, xs[1:])),
           "falling": lambda xs: all(a > b for a, b in zip(xs, xs[1:])),
           "inner_peak": lambda xs: 0 < xs.index(max(xs)) < len(xs) - 1}


def read_claims(source: str) -> list[dict]:
    """Each `// claim: EXPR` line of the Typst source, with its line number and the sentence below it."""
    lines, out = source.splitlines(), []
    for i, line in enumerate(lines):
        if m := re.match(r"\s*// claim:\s*(.+)$", line):
            below = next((x.strip() for x in lines[i + 1:] if x.strip() and not x.strip().startswith("//")), "")
            below = re.sub(r'#v\("([^"]+)"\)', r"<\1>", below)  # a fact printed: <its name>
            out.append({"line": i + 1, "expr": m.group(1).strip(), "sentence": below[:70] + "…" * (len(below) > 70)})
    return out


def check_claim(claim: dict, facts: dict) -> str | None:
    """None when the claim holds; else why not, naming the sentence."""
    where = f"report.typ line {claim['line']} (\"{claim['sentence']}\")"
    if missing := [k for _, k in NAME.findall(claim["expr"]) if k and k not in facts["n"]]:
        return f"{where} claims about {', '.join(missing)}, which these results do not have"
    try:
        ok = eval(NAME.sub(lambda m: m.group(1) or f"_n[{m.group(2)!r}]", claim["expr"]),  # noqa: S307 - our source
                  {"__builtins__": {}, "_n": facts["n"], **HELPERS})
    except Exception as exc:  # noqa: BLE001 - a None compared, a typo: the claim cannot be checked
        return f"{where}: the claim `{claim['expr']}` cannot be evaluated ({type(exc).__name__}: {exc})"
    return None if ok else f"{where}: the claim `{claim['expr']}` does not hold for these results"


def check_claims(facts: dict, source: str, strict: bool) -> list[str]:
    """Every claim of the source and every fact it prints: the first problem raises ReportError when
    strict, else they all come back (as warnings)."""
    problems = [p for c in read_claims(source) if (p := check_claim(c, facts))]
    if unknown := sorted({k for k in re.findall(r'#v\("([^"]+)"\)', source) if k not in facts["v"]}):
        problems.append(f"report.typ prints facts these results do not have: {', '.join(unknown[:8])}")
    if problems and strict:
        raise ReportError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return problems


# ------------------------------------------------------------------------------------------ loading
def _json(path: Path, needed=()) -> dict:
    if not path.exists():
        raise ReportError(f"{path} is missing: the study has not finished (rerun run_experiments.py)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} is not valid JSON ({exc}): {REBUILD}") from None
    if missing := [k for k in needed if not isinstance(data, dict) or not isinstance(data.get(k), dict)]:
        raise ReportError(f"{path} has no {', '.join(missing)}: {REBUILD}")
    return data


def load_results(results_dir) -> dict:
    """Read the results files the report needs; a missing or damaged one stops with a one-line message."""
    rd = Path(results_dir)
    if not rd.is_dir():
        raise ReportError(f"results directory {rd} does not exist: run `make study` (or "
                          f"`python run_experiments.py --quick --results-dir {rd}`) first")
    summary = _json(rd / "summary.json", ("mlp", "cnn", "study", "stages"))
    check_against_records(rd, summary)
    return {"dir": rd, "summary": summary, "manifest": _json(rd / "manifest.json", ("stages", "finals"))}


def check_against_records(rd: Path, summary: dict) -> None:
    """Every number summary.json states about the finals must be what the final run records say, else an edited
    or stale summary would put numbers in the PDF that no run produced."""
    for model in ("mlp", "cnn"):
        stated, accs = summary[model], []
        for seed in stated.get("seeds") or []:
            rec = _json(rd / "runs" / f"{seed['key']}.json")
            accs.append(rec.get("test_acc"))
            true = {"test_acc": rec.get("test_acc"), "val_acc": rec.get("val_acc"),
                    "test_acc_wilson95": list(wilson_interval(round(rec["test_acc"] * rec["n_test"]), rec["n_test"]))}
            checks = [(f"{model} seed {seed['seed']} {k}", seed[k], x) for k, x in true.items() if k in seed]
            checks += [(f"{model}.{k}", stated.get(k), x) for k, x in true.items() if seed["key"] == stated.get("key")]
            if len(accs) == len(stated["seeds"]) > 1:
                checks += [(f"{model}.test_acc_mean", stated.get("test_acc_mean"), np.mean(accs)),
                           (f"{model}.test_acc_std", stated.get("test_acc_std"), np.std(accs, ddof=1))]
            for where, said, x in checks:
                if not np.allclose(np.asarray(said, float), np.asarray(x, float), rtol=1e-9, atol=1e-12):
                    raise ReportError(f"{rd / 'summary.json'}: {where} is {said}, but the run records give {x}: "
                                      f"{REBUILD}")


def find_figures(rd: Path) -> tuple[dict, list[str]]:
    """{stem: {"file", "width" (inches)}} of the figures present, and the names of those missing. A damaged
    one raises ReportError naming it (Typst's own error does not)."""
    from PIL import Image
    present, missing = {}, []
    for fname, width in plots.FIG_WIDTH_IN.items():
        try:
            with Image.open(path := rd / "figures" / fname) as image:
                image.verify()  # the PNG's chunk checksums: a truncated or altered file fails here
            present[Path(fname).stem] = {"file": fname, "width": width}
        except FileNotFoundError:
            missing.append(fname)
        except Exception as e:  # noqa: BLE001 - PIL raises several kinds
            raise ReportError(f"{path} is damaged ({e}): redraw it with python run_experiments.py --plots-only "
                              f"--results-dir {rd}") from None
    return present, missing


# ------------------------------------------------------------------------------------------ build
def compile_pdf(facts: dict, figures_dir: Path, out_pdf: Path, source: Path = TYP_SOURCE) -> dict:
    """Compile in a scratch folder holding the source, facts.json and the figures (Typst reads files only
    under its root); the PDF replaces out_pdf atomically. Returns the page counts {"body", "total"}."""
    import typst
    with tempfile.TemporaryDirectory(prefix="report-build-") as tmp:
        tmp = Path(tmp)
        shutil.copy(source, tmp / "report.typ")
        shutil.copy(BIB_SOURCE, tmp / "references.bib")
        (tmp / "facts.json").write_text(json.dumps(facts, indent=1, default=str))
        (tmp / "figures").mkdir()
        for fig in facts["figures"].values():
            shutil.copy(figures_dir / fig["file"], tmp / "figures" / fig["file"])
        try:
            pdf = typst.compile(str(tmp / "report.typ"), root=str(tmp))
            body, total = (json.loads(typst.query(str(tmp / "report.typ"), f"<{k}>", field="value", one=True,
                                                  root=str(tmp))) for k in ("appendix-page", "last-page"))
        except Exception as exc:  # typst errors are long; the first line says where
            raise ReportError(f"typst could not compile report.typ: {str(exc).strip().splitlines()[0]}") from exc
    _write(out_pdf, pdf)
    if body - 1 > MAX_BODY_PAGES or total > MAX_PAGES:
        print(f"warning: the report has {body - 1} pages before the appendix and {total} in all "
              f"(limits {MAX_BODY_PAGES} and {MAX_PAGES})", file=sys.stderr)
    return {"body": body - 1, "total": total}


def load_group(path=GROUP_FILE) -> dict:
    """Group name, members, contributions. A template (empty fields) gives placeholders; anything invalid
    (TOML syntax, wrong types, nan or negative contributions, a sum other than 100) raises cli.UserError."""
    def bad(msg):
        return cli.UserError(f"{path}: {msg} (see the comments in report/group.toml)")
    if not Path(path).is_file():  # a mistyped --group-file would otherwise give a report of placeholders
        raise bad("no such file")
    try:
        data = tomllib.loads(Path(path).read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"not valid TOML ({exc})") from None
    gname, members = data.get("group_name", ""), data.get("member", [])
    if not (isinstance(gname, str) and isinstance(members, list) and all(
            isinstance(m, dict) and all(isinstance(m.get(k, ""), str) for k in ("name", "email")) for m in members)):
        raise bad("group_name must be a string, and each [[member]] a name and email that are strings")
    given = [m.get("contribution") for m in members]
    if wrong := [c for c in given if c is not None and not cli.NON_NEGATIVE[0](c)]:  # [0]: the rule's test
        raise bad(f"a contribution must be a number, a finite percentage >= 0, got {wrong[0]!r}")
    if any(c is not None for c in given) and (None in given or abs(sum(given) - 100) > 1e-6):
        raise bad("every member needs a contribution once one is given" if None in given else
                  f"contributions add up to {sum(given):g}%, not 100%")
    shown = [{"name": m.get("name", "").strip() or f"[Member {i} name]", "email": m.get("email", "").strip()
              or f"[member{i} email]", "contribution": "[contribution %]" if c is None else f"{c:g}%"}
             for i, (m, c) in enumerate(zip(members or [{}], given or [None]), 1)]
    filled = gname.strip() and members and None not in given and all(m["name"][:1] != "[" and m["email"][:1] != "["
                                                                      for m in shown)
    zip_name = "".join(c if c.isalnum() or c in "-_." else "-" for c in gname.strip()).strip("-.") or "group-name"
    return {"name": gname.strip() or "[Group name]", "zip_name": zip_name, "members": shown, "placeholder": not filled}


def build_report(results_dir="results", out_pdf=None, group_file=GROUP_FILE, facts_out=None,
                 source=TYP_SOURCE, strict: bool | None = None) -> Path:
    """Read results_dir, compute the facts, check the claims of `source`, compile the PDF; return its path.
    out_pdf: default report/report.pdf for the repository's results/, else <results_dir>/report.pdf (a quick
    or test study never overwrites the committed report). strict (default: unless the results are --quick
    ones): a claim that fails stops the build. facts_out: also write facts.json there."""
    rd = Path(results_dir)
    out_pdf = Path(out_pdf or (REPORT_DIR if rd.resolve() == (REPO_DIR / "results").resolve() else rd) / "report.pdf")
    group, results = load_group(group_file), load_results(rd)
    try:
        facts = make_facts(results, group)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:  # a damaged file, in one line
        raise ReportError(f"{rd}'s summary.json, manifest.json or run records do not have the expected shape "
                          f"({type(exc).__name__}: {exc}): rebuild them with `python run_experiments.py "
                          f"--plots-only --results-dir {rd}`") from exc
    quick = facts["n"]["design.quick"]
    problems = check_claims(facts, Path(source).read_text(), strict=not quick if strict is None else strict)
    for warning in ([f"{group_file} is not filled in: the report shows placeholders"] * group["placeholder"]
                    + [f"{len(problems)} claim(s) do not hold for these results; the first: {p}" for p in problems[:1]]
                    + [f"figures missing from {rd / 'figures'}: {', '.join(facts['missing_figures'])} (redraw them "
                       f"with `python run_experiments.py --plots-only --results-dir {rd}`)"
                       for _ in facts["missing_figures"][:1]]):
        print(f"warning: {warning}", file=sys.stderr)
    facts["pages"] = compile_pdf(facts, rd / "figures", out_pdf, Path(source))
    if facts_out is not None:
        _write(Path(facts_out), json.dumps(facts, indent=1, default=str).encode())
    return out_pdf


def _write(path: Path, data: bytes) -> None:
    """An output the user named (--out, --facts): a path where no file can be written is a ReportError."""
    try:
        atomic_write(path, data)
    except OSError as e:
        raise ReportError(f"cannot write {path}: {e.strerror or e}") from None


def main(argv=None) -> int:
    return cli.run(_main, "report.build", argv, on_interrupt="the report was not written; the results are untouched")


def _main(argv=None) -> int:
    p = ArgumentParser(description="Build the PDF report from saved study results.")
    p.add_argument("--results-dir", type=path_arg, default="results", help="the study's results (default: results)")
    p.add_argument("--out", type=path_arg, help="PDF to write (default: report/report.pdf for results/, else in it)")
    p.add_argument("--group-file", type=path_arg, default=str(GROUP_FILE), help="default: report/group.toml")
    p.add_argument("--facts", type=path_arg, help="also write the computed facts.json here")
    p.add_argument("--zip-name", action="store_true", help="print the submission zip's name and exit (make zip)")
    args = p.parse_args(argv)
    if args.zip_name:  # group_name made safe for a file name
        print(load_group(args.group_file)["zip_name"])
        return 0
    print(f"wrote {build_report(args.results_dir, args.out, args.group_file, args.facts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
