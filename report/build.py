"""Build report/report.pdf from the study's saved results (assignment Q4).

    python -m report.build                                    # results/ -> report/report.pdf
    python -m report.build --results-dir results-quick --out /tmp/r.pdf

Nothing in report.typ is a number typed by hand. This module reads results/ (summary.json, manifest.json,
mlp_runs.csv, cnn_runs.csv, init_stats.csv, figures/), measures each comparison's outcome (which level won,
by how much, against what noise), writes every table and every result-dependent sentence into facts.json
and compiles the Typst source in-process with the `typst` package. Each outcome a sentence states is also
listed in facts["claims"]; `check_claims` re-derives them from the run CSVs before the PDF is written, so a
report that contradicts its results does not build. The gradient checks run here (report/gradcheck.py)
and are saved to <results>/gradcheck.json. Group details come from report/group.toml.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REPORT_DIR = Path(__file__).resolve().parent
REPO_DIR = REPORT_DIR.parent
TYP_SOURCE = REPORT_DIR / "report.typ"
BIB_SOURCE = REPORT_DIR / "references.bib"
GROUP_FILE = REPORT_DIR / "group.toml"

from preprocessing import CLASS_NAMES  # noqa: E402
import cli  # noqa: E402
from cli import ArgumentParser, atomic_write, path_arg  # noqa: E402
from run_experiments import NOISE_Z, noise_margin  # noqa: E402
from study_results import wilson_interval  # noqa: E402
import run_experiments  # noqa: E402
from report import text  # noqa: E402
from report.text import name  # noqa: E402

REL_TOL = 1e-9
MAX_BODY_PAGES, MAX_PAGES = 12, 16  # the assignment's report: pages before the appendix, and in all
MLP_STAGES = tuple(stage.id for stage in run_experiments.MLP_STAGES)
CNN_STAGES = tuple(stage.id for stage in run_experiments.CNN_STAGES)
ABLATION = run_experiments.ABLATION_STAGE.id
# Published results for context: the benchmark table of the dataset's README (zalandoresearch/fashion-mnist,
# commit 02cf067), as submitted there (not re-run by its authors or by us).
BASELINES = [("mlp", "MLP 256-128-64", "none", 0.900),
             ("cnn", "2 conv layers with max pooling (Keras)", "none", 0.876),
             ("cnn", "3 conv layers + pooling + BatchNorm", "none", 0.903),
             ("cnn", "2 conv layers, under 100k parameters", "none", 0.925),
             ("cnn", "3 conv + pooling and 2 FC + dropout", "none", 0.926),
             ("cnn", "ResNet18", "normalisation, flips, translation, rotation", 0.949),
             ("human", "human performance (crowd-sourced, 1,000 images)", "–", 0.835)]


class ReportError(cli.UserError):
    """One-line, user-facing reason why the report cannot be built."""


class ContradictionError(ReportError):
    """A statement in the report disagrees with the results files."""


# ------------------------------------------------------------------------------------------ formatting
def pct(x, digits=2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def pts(x, digits=2) -> str:
    """A difference of two accuracies in percentage points."""
    return "–" if x is None else f"{100 * x:.{digits}f}"


def pm(mean, std) -> str:
    return pct(mean) if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}%"


def count(n) -> str:
    return "–" if n is None else f"{int(n):,}"


def mega(n) -> str:
    return "–" if n is None else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def sci(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    mant, exp = f"{x:.1e}".split("e")
    return f"{mant}e{int(exp)}"


# ------------------------------------------------------------------------------------------ loading
def _json(path: Path, needed=()) -> dict:
    if not path.exists():
        raise ReportError(f"{path} is missing: the study has not finished (rerun run_experiments.py)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} is not valid JSON ({exc}): rebuild it with "
                          f"`python run_experiments.py --plots-only`") from None
    missing = [k for k in needed if not isinstance(data, dict) or k not in data]
    if missing:
        raise ReportError(f"{path} has no {', '.join(map(repr, missing))} entry: rebuild it with "
                          f"`python run_experiments.py --plots-only`")
    return data


def _csv(path: Path, needed=()) -> pd.DataFrame:
    if not path.is_file():
        raise ReportError(f"{path} is missing: the study has not finished (rerun run_experiments.py)")
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} cannot be read ({str(exc).splitlines()[0]})") from None
    missing = [c for c in needed if c not in df]
    if missing:
        raise ReportError(f"{path} has no column {', '.join(missing)}")
    return df


def _final_problem(m) -> str | None:
    """Why a final model's entry of summary.json cannot be reported (one phrase), or None."""
    if not isinstance(m, dict):
        return "is not an object"
    missing = [k for k in ("test_acc", "val_acc", "config", "key") if k not in m]
    if missing:
        return f"has no {', '.join(map(repr, missing))}"
    bad = [k for k in ("test_acc", "val_acc") if not (isinstance(m[k], (int, float)) and 0 <= m[k] <= 1)]
    if bad:
        return f"has {' and '.join(bad)} outside [0, 1] or not a number"
    conf, n = m.get("confusion"), len(CLASS_NAMES)
    if conf is not None and not (isinstance(conf, list) and len(conf) == n and all(
            isinstance(row, list) and len(row) == n and all(isinstance(c, int) and c >= 0 for c in row)
            for row in conf)):
        return f"has a confusion matrix that is not {n} x {n} counts"
    return None


def load_results(results_dir) -> dict:
    """Read every results file the report needs; a missing or damaged one stops with a one-line message."""
    rd = Path(results_dir)
    if not rd.is_dir():
        raise ReportError(f"results directory {rd} does not exist: run `make study` (or "
                          f"`python run_experiments.py --quick --results-dir {rd}`) first")
    summary = _json(rd / "summary.json", ("mlp", "cnn", "study"))
    for model in ("mlp", "cnn"):
        problem = _final_problem(summary[model])
        if problem:
            raise ReportError(f"{rd / 'summary.json'}: {model} {problem}: rebuild it with "
                              f"`python run_experiments.py --plots-only`")
    check_against_records(rd, summary)
    cols = ("study", "variant", "seed", "val_acc", "diverged")
    runs = pd.concat([_csv(rd / f"{m}_runs.csv", cols) for m in ("mlp", "cnn")], ignore_index=True)
    init = _csv(rd / "init_stats.csv") if (rd / "init_stats.csv").is_file() else None
    return {"dir": rd, "summary": summary, "manifest": _json(rd / "manifest.json", ("stages",)),
            "runs": runs, "init": init}


def check_against_records(rd: Path, summary: dict) -> None:
    """What the report states about the finals comes from summary.json; each number must be what the final
    run records say, else an edited or stale summary would put numbers in the PDF that no run produced."""
    def differ(where: str, stated, true) -> None:
        if not np.allclose(np.asarray(stated, float), np.asarray(true, float), rtol=1e-9, atol=1e-12):
            raise ReportError(f"{rd / 'summary.json'}: {where} is {stated}, but the run records give {true}: "
                              f"rebuild it with `python run_experiments.py --plots-only`")

    for model in ("mlp", "cnn"):
        stated = summary[model]
        test_accs = []
        for seed in stated.get("seeds") or []:
            rec = _json(rd / "runs" / f"{seed['key']}.json", ("test_acc", "val_acc", "n_test"))
            n = rec["n_test"]
            true = {"test_acc": rec["test_acc"], "val_acc": rec["val_acc"],
                    "test_acc_wilson95": list(wilson_interval(rec["test_acc"] * n, n))}
            test_accs.append(rec["test_acc"])
            for field, value in true.items():
                if field in seed:
                    differ(f"{model} seed {seed['seed']} {field}", seed[field], value)
                if seed["key"] == stated["key"] and field in stated:
                    differ(f"{model}.{field}", stated[field], value)
        if len(test_accs) > 1:
            differ(f"{model}.test_acc_mean", stated["test_acc_mean"], np.mean(test_accs))
            differ(f"{model}.test_acc_std", stated["test_acc_std"], np.std(test_accs, ddof=1))


# ------------------------------------------------------------------------------------------ outcomes
@dataclass
class Outcome:
    """How one comparison came out, in display form (see report/text.py). kind: 'default_clear',
    'default_close', 'other_clear' or 'other_close' -- who came first (the default or another level) and
    whether the gap to `other` exceeds NOISE_Z standard errors."""
    kind: str
    best: str
    default: str
    other: str
    best_acc: str
    other_acc: str
    gap: str
    noise: str
    worst: str
    worst_acc: str
    worst_train: str   # the last level's training accuracy ('–' when not recorded)
    up: bool           # ordered factors: the level compared with the default is the larger one
    cost: str          # the first level's multiply-adds relative to the second's, in words
    raw: dict          # the same in raw variants and floats, for the claims


def pooled_sd(rows: list[dict]) -> float | None:
    """Seed-to-seed std of validation accuracy, pooled over the table rows run with 2+ seeds."""
    return run_experiments.pooled_sd((r["n"], r["val_acc_std"]) for r in rows)


def _as_float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def outcome(study: str, stage: dict, contrast=()) -> Outcome | None:
    """Compare the best eligible level (no contrast level, nothing diverged) with the default, or, when the
    default is best, the default with the best challenger."""
    rows = [r for r in stage.get("table", []) if r.get("n") and r.get("val_acc") is not None]
    ok = [r for r in rows if str(r["variant"]) not in contrast and not r.get("diverged")]
    if len(ok) < 2:
        return None
    by = {str(r["variant"]): r for r in ok}
    default = str(stage.get("default")) if str(stage.get("default")) in by else str(ok[0]["variant"])
    ranked = sorted(ok, key=lambda r: (-round(r["val_acc"], 9), str(r["variant"]) != default))  # ties: the default
    best = str(ranked[0]["variant"])
    other = default if best != default else str(next(r for r in ranked if str(r["variant"]) != default)["variant"])
    sd = pooled_sd(ok)
    gap = by[best]["val_acc"] - by[other]["val_acc"]
    noise = noise_margin(sd, by[best]["n"], by[other]["n"])
    clear = noise is not None and gap > noise
    kind = ("default" if best == default else "other") + ("_clear" if clear else "_close")
    worst = str(ranked[-1]["variant"])
    a, b = _as_float(other if best == default else best), _as_float(default)
    return Outcome(kind, name(study, best), name(study, default), name(study, other),
                   pct(by[best]["val_acc"]), pct(by[other]["val_acc"]), pts(gap),
                   f"{pts(noise)} points" if noise is not None else "not measured with one seed",
                   name(study, worst), pct(by[worst]["val_acc"]),
                   pct(by[worst].get("train_acc")),
                   a is not None and b is not None and a > b, _cost(by[best].get("macs"), by[other].get("macs")),
                   {"best": best, "default": default, "other": other, "kind": kind, "gap": gap})


def _cost(a, b) -> str:
    """'at 2.8 times the multiply-adds' / 'at the same multiply-adds' (within 10%)."""
    if not a or not b:
        return "at a cost not recorded"
    r = a / b
    return "at about the same multiply-adds" if 0.9 <= r <= 1.1 else f"at {r:.2g} times the multiply-adds"


# ------------------------------------------------------------------------------------------ facts
class Facts:
    """Collects claims: each outcome a sentence states, to be re-derived from the CSVs by check_claims."""

    def __init__(self):
        self.claims: list[dict] = []

    def claim(self, **kw):
        self.claims.append(kw)


def _capped(stage: dict) -> list[str]:
    """The stage's levels over the multiply-add cap (none if the manifest's list is missing or damaged)."""
    capped = stage.get("macs_capped")
    return [str(v) for v in capped] if isinstance(capped, list) else []


def _capped_parts(study: str, stage: dict, by: dict, levels: list[str]) -> list[str]:
    """'3 layers (87.54%, 1.563 times the default's multiply-adds)' for each level."""
    ratio = stage.get("macs_ratio") if isinstance(stage.get("macs_ratio"), dict) else {}
    return [f"{name(study, v)} ({pct(by[v]['val_acc'])}, {ratio[v]:.3f} times the default's multiply-adds)"
            if isinstance(ratio.get(v), (int, float)) else f"{name(study, v)} ({pct(by[v]['val_acc'])})"
            for v in levels if v in by]


def capped_note(study: str, stage: dict, o: Outcome) -> str:
    """' Above the default but over the multiply-add cap: 3 layers (87.54%, 1.563 times ...).' for the capped
    levels whose mean beat the default's; '' when none did."""
    by = {str(r["variant"]): r for r in stage.get("table", []) if r.get("val_acc") is not None}
    base = by.get(o.raw["default"], {}).get("val_acc")
    above = [v for v in _capped(stage) if base is not None and by.get(v, {}).get("val_acc", 0) > base]
    if not above:
        return ""
    return f" Above the default but over the multiply-add cap: {_join(_capped_parts(study, stage, by, above))}."


def only_default_sentence(study: str, stage: dict) -> str:
    """'Every other level is over the multiply-add cap, ...' when the default is the stage's only eligible
    level ('' otherwise): nothing was compared, so no outcome sentence applies."""
    by = {str(r["variant"]): r for r in stage.get("table", []) if r.get("val_acc") is not None}
    default, capped = str(stage.get("default")), _capped(stage)
    others = [v for v in by if v != default and v not in (stage.get("contrast") or [])]
    if default not in by or not capped or others:
        return ""
    return (f"Every other level is over the multiply-add cap, so the default {name(study, default)} "
            f"({pct(by[default]['val_acc'])}) stays without a comparison: "
            f"{_join(_capped_parts(study, stage, by, capped))}.")


def stage_rows(study: str, stage: dict, winner: str | None) -> list[list[str]]:
    rows = []
    for r in stage.get("table", []):
        v = str(r["variant"])
        mark = (" (default)" if v == str(stage.get("default")) else "") + (" ✓" if v == winner else "")
        acc = "diverged" if r.get("diverged") or r.get("val_acc") is None else pm(r["val_acc"], r.get("val_acc_std"))
        rows.append([name(study, v) + mark, str(r.get("n", "–")), acc,
                     pct(r.get("train_acc")),
                     mega(r.get("n_params")), mega(r.get("macs")),
                     f"{r['seconds']:.3g}" if r.get("seconds") is not None else "–"])
    return rows


def make_stage_facts(results: dict, f: Facts, studies) -> list[dict]:
    out = []
    stages = results["summary"].get("stages", {})
    mstages = results["manifest"].get("stages", {})
    extra = [s for s in stages if s.startswith(studies[0][:4]) and s not in studies and s != ABLATION]
    for study in [s for s in studies if s in stages] + extra:
        stage = {**mstages.get(study, {}), **stages[study]}
        contrast = [str(c) for c in stage.get("contrast") or []]
        o = outcome(study, stage, contrast)
        winner = str(stage.get("winner")) if stage.get("winner") is not None else None
        entry = {"id": study, "title": text.TITLES.get(study, study.replace("_", " ")),
                 "rows": stage_rows(study, stage, winner), "sentence": "", "kind": None,
                 "edge": bool(stage.get("edge")), "extended": bool(stage.get("extended")),
                 "capped": bool(_capped(stage))}
        if o is not None:
            entry["sentence"], entry["kind"], entry["best"] = _cap(text.stage_sentence(study, o)), o.kind, o.best
            entry["sentence"] += capped_note(study, stage, o)
            f.claim(type="stage", study=study, contrast=contrast, **o.raw)
        elif only_default := only_default_sentence(study, stage):
            entry["sentence"], entry["kind"] = only_default, "only_default"
            entry["best"] = name(study, stage.get("default"))
        entry["winner"] = name(study, winner) if winner else ""
        out.append(entry)
    return out


def make_init_facts(results: dict, f: Facts) -> dict:
    """The initialisation comparison with and without BatchNorm: training outcome (cnn_init stage, its
    'no BN' contrast levels) and the per-layer statistics at initialisation (init_stats.csv)."""
    stage = {**results["manifest"].get("stages", {}).get("cnn_init", {}),
             **results["summary"].get("stages", {}).get("cnn_init", {})}
    contrast = [str(c) for c in stage.get("contrast") or []]
    rows = [r for r in stage.get("table", []) if str(r["variant"]) in contrast and r.get("val_acc") is not None]
    out = {"sentences": [], "stats": []}
    if rows:
        lo, hi = min(rows, key=lambda r: r["val_acc"]), max(rows, key=lambda r: r["val_acc"])
        spread = hi["val_acc"] - lo["val_acc"]
        sd = pooled_sd(rows)
        noise = noise_margin(sd, lo["n"], hi["n"])
        f.claim(type="spread", study="cnn_init", variants=[str(r["variant"]) for r in rows],
                low=str(lo["variant"]), high=str(hi["variant"]), clear=noise is not None and spread > noise)
        if noise is not None and spread > noise:
            out["sentences"].append(
                f"Without BatchNorm the initialisation decides the outcome: {_scheme(hi['variant'])} "
                f"reached {pct(hi['val_acc'])} and {_scheme(lo['variant'])} only {pct(lo['val_acc'])}, "
                f"{pts(spread)} points apart against a noise of {pts(noise)}.")
        else:
            out["sentences"].append(
                f"Even without BatchNorm the three schemes end within the noise of each other (from "
                f"{pct(lo['val_acc'])} to {pct(hi['val_acc'])}), so at this depth the network recovers from a "
                f"poor starting scale during training.")
    out["stats"] = init_stat_rows(results)
    out["caption"] = init_caption(results)
    return out


def init_caption(results: dict) -> str:
    """How much the schemes' last-layer activation spread differs, with and without BatchNorm."""
    st = results["init"]
    if st is None or "batchnorm" not in st:
        return ""
    st = st[st["model"] == "cnn"]
    last = st[st["layer"] == st["layer"].max()]
    fold = {}
    for bn, g in last.groupby(last["batchnorm"].astype(str).str.lower().isin(["true", "1", "1.0"])):
        lo = float(g["act_std"].min())
        fold[bool(bn)] = float(g["act_std"].max()) / lo if lo > 0 else float("inf")
    if len(fold) < 2:
        return ""
    evens = fold[False] > fold[True]

    def times(x):
        return ("by less than 1%" if x < 1.01 else f"by only {100 * (x - 1):.0f}%" if x < 1.5
                else f"{x:,.0f}-fold" if x >= 20 else f"{x:.2g}-fold")
    return (f"Across schemes the last convolution's activation spread differs {times(fold[False])} without "
            f"BatchNorm and {times(fold[True])} with it: "
            + ("BatchNorm evens out the schemes' starting scale." if evens else
               "BatchNorm does not even out the schemes' starting scale here."))


def init_stat_rows(results: dict) -> list[list[str]]:
    st = results["init"]
    if st is None or st.empty:
        return []
    st = st[st["model"] == "cnn"]
    if "batchnorm" not in st:
        st = st.assign(batchnorm=False)
    rows = []
    for (scheme, bn), g in st.groupby([st["scheme"].astype(str), st["batchnorm"]], sort=False):
        g = g.sort_values("layer")
        first, last = g.iloc[0], g.iloc[-1]
        rows.append([name("cnn_init", scheme), "yes" if str(bn).lower() in ("true", "1") else "no",
                     f"{first['act_std']:.3g}", f"{last['act_std']:.3g}", sci(first["grad_norm"]),
                     sci(last["grad_norm"]), pct(float(g["dead_frac"].max()), 1)])
    return rows


def make_ablation_facts(results: dict, f: Facts) -> dict:
    abl = results["summary"].get("ablation") or {}
    stage = {**results["manifest"].get("stages", {}).get(ABLATION, {}),
             **results["summary"].get("stages", {}).get(ABLATION, {}),
             **(abl if isinstance(abl, dict) else {"table": abl})}
    table = [r for r in stage.get("table", []) if r.get("val_acc") is not None and not r.get("diverged")]
    full = next((r for r in table if str(r["variant"]) == str(stage.get("default", "full recipe"))), None)
    if full is None or len(table) < 2:
        return {"rows": stage_rows(ABLATION, stage, None), "sentence": "", "present": bool(table),
                "sweep": sweep_sentence(results["dir"])}
    sd = pooled_sd(table)
    hurt, helped, flat, flat_train = [], [], [], []
    for r in table:
        if r is full:
            continue
        d = r["val_acc"] - full["val_acc"]
        noise = noise_margin(sd, r["n"], full["n"])
        what = str(r["variant"]).removeprefix("no ")
        item = f"{name(ABLATION, what)} ({100 * d:+.2f} points)"
        (hurt if noise is not None and d < -noise else helped if noise is not None and d > noise else flat).append(item)
        if item in flat:
            flat_train.append(r.get("train_acc"))
        f.claim(type="ablation", variant=str(r["variant"]), full=str(full["variant"]),
                effect="hurt" if item in hurt else "helped" if item in helped else "flat")
    parts = []
    if hurt:
        parts.append(f"Removing {_join(hurt)} lowered validation accuracy by more than the noise, so "
                     f"{'these parts earn their' if len(hurt) > 1 else 'this part earns its'} place in the recipe.")
    if flat:
        parts.append(f"Removing {_join(flat)} changed it by less than the noise"
                     f"{' (pooled seed std ' + pts(sd) + ' points)' if sd is not None else ' (one seed: noise unmeasured)'}.")
        parts.append(_fit_cost_sentence(full.get("train_acc"), flat_train))
    if helped:
        parts.append(f"Removing {_join(helped)} raised it beyond the noise: at this budget that part of the "
                     f"recipe costs accuracy.")
    return {"rows": stage_rows(ABLATION, stage, None), "sentence": " ".join(parts), "present": True,
            "sweep": sweep_sentence(results["dir"])}


def _fit_cost_sentence(full_train: float | None, removed_train: list) -> str:
    """When every removal that left validation within the noise raised training accuracy, say what that shows:
    those parts regularise, which costs fit at the ablation's budget without showing on validation."""
    if full_train is None or not removed_train or any(t is None or t <= full_train for t in removed_train):
        return ""
    lo, hi = min(removed_train), max(removed_train)
    span = pct(lo) if len(removed_train) == 1 else f"{pct(lo)} – {pct(hi)}"
    each = "Each of those removals" if len(removed_train) > 1 else "That removal"
    return (f"{each} raised training accuracy ({pct(full_train)} with the full recipe, {span} without): these "
            f"parts regularise, which at the ablation's short budget costs fit without yet showing on validation.")


def sweep_sentence(results_dir: Path) -> str:
    """Where the recipe came from: the sweep's rows (results/cnn_recipe_sweep.jsonl), on validation only."""
    try:
        rows = [json.loads(line) for line in (results_dir / "cnn_recipe_sweep.jsonl").read_text().splitlines()
                if line.strip()]
        df = pd.DataFrame(rows)
        means = df.groupby("name")["val_plain"].agg(["mean", "count"])
    except (OSError, ValueError, KeyError):
        return ""
    best = means["mean"].idxmax()
    return (f"The recipe itself was chosen before the study by a sweep of {len(means)} training recipes, scored "
            f"on validation only (benchmarks/cnn_recipe_sweep.py, rows in results/cnn_recipe_sweep.jsonl); "
            f"the best, named {best} there, reached {pct(means.loc[best, 'mean'])} (mean of "
            f"{int(means.loc[best, 'count'])} seeds). The ablation below tests each of its parts again inside "
            f"this study.")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _uncap(s: str) -> str:
    return s[:1].lower() + s[1:] if s[1:2].islower() else s


def _scheme(v) -> str:
    """'he, no BN' -> 'He' (the contrast levels of the initialisation stage, named by their scheme)."""
    return name("cnn_init", str(v).split(",")[0])


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def edge_sentence(results: dict) -> str:
    """One sentence for every track: the stages whose winner stayed at the edge of its range."""
    stages = results["manifest"].get("stages", {})
    edge = [f"{_uncap(text.TITLES.get(s, s))} ({name(s, st.get('winner'))})" for s, st in stages.items()
            if st.get("edge") and st.get("winner") is not None]
    over = [f"{name(s, v)} in the {_uncap(text.TITLES.get(s, s))}" for s, st in stages.items()
            for v in _capped(st)]
    capped = "" if not over else f" Over the multiply-add cap, shown but not eligible: {_join(over)}."
    if not edge:
        return ("No stage's winner stayed at the edge of its range: every chosen level of an ordered factor was "
                "tried against a level on each side of it." + capped)
    return (f"The chosen level stayed at the edge of its range, even after any extension, for the "
            f"{_join(edge)}: a better level may lie beyond it." + capped)


# ------------------------------------------------------------------------------------------ finals
def final_facts(results: dict, model: str, f: Facts) -> dict:
    m = results["summary"][model]
    for fld in ("val_acc", "test_acc"):
        f.claim(type="summary", path=[model, fld], value=m[fld])
    seeds = m.get("seeds") or []
    lo, hi = (m.get("test_acc_wilson95") or [None, None])[:2]
    spread = ("one seed only: no spread is reported" if m.get("test_acc_std") is None else
              f"{pm(m.get('test_acc_mean'), m.get('test_acc_std'))} over {len(seeds)} seeds")
    return {"val_acc": pct(m["val_acc"]), "test_acc": pct(m["test_acc"]),
            "wilson": f"{pct(lo)} – {pct(hi)}" if lo is not None else "–",
            "seeds": spread, "n_seeds": len(seeds), "macro_f1": f"{m['test_macro_f1']:.4f}"
            if m.get("test_macro_f1") is not None else "–",
            "n_params": count(m.get("n_params")), "macs": mega(m.get("macs")),
            "minutes": f"{m['train_seconds'] / 60:.1f}" if m.get("train_seconds") is not None else "–",
            "epochs": str(m.get("epochs_run", "–")),
            "config": [[CONFIG_LABELS.get(k, k.replace("_", " ")), _value(v)]
                       for k, v in (m.get("config") or {}).items() if k not in ("device", "seed")]}


TRAINING_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "schedule", "warmup_epochs", "epochs", "batch_size",
                 "patience", "head_lr", "head_epochs", "augment", "erase", "label_smoothing", "tta")


def training_rows(s: dict) -> list[list[str]]:
    """The settings that answer 'learning rate, epochs' for both final models, side by side."""
    cm, cc = s["mlp"].get("config") or {}, s["cnn"].get("config") or {}
    return [[CONFIG_LABELS.get(k, k), _value(cm[k]) if k in cm else "–", _value(cc[k]) if k in cc else "–"]
            for k in TRAINING_KEYS if k in cm or k in cc]


CONFIG_LABELS = {"hidden": "hidden widths", "activation": "activation", "dropout": "dropout probability",
                 "init": "weight initialisation", "optimizer": "optimiser", "lr": "learning rate",
                 "weight_decay": "weight decay", "schedule": "learning-rate schedule", "warmup_epochs": "warm-up epochs",
                 "epochs": "epochs", "batch_size": "batch size", "patience": "early-stopping patience (0: off)",
                 "standardize": "standardise inputs", "filters": "filters per convolution", "base_filters": "base filters",
                 "kernel_size": "kernel size", "pool": "pooling", "batchnorm": "BatchNorm", "head_mode": "head training",
                 "head_hidden": "head hidden widths", "head_activation": "head activation",
                 "head_dropout": "head dropout", "head_lr": "head learning rate", "head_epochs": "head epochs",
                 "augment": "augmentation (shifts, mirror)", "erase": "random-erasing probability",
                 "label_smoothing": "label smoothing", "tta": "test-time mirroring", "momentum": "momentum",
                 "precision": "arithmetic precision", "channels_last": "channels-last memory layout"}


def _value(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) if v else "none"
    return "none" if v is None else name("", v) if isinstance(v, str) else str(v)


def _kept_one(label: str, m: dict) -> str:
    """Which of the two full-budget candidates (chain of winners, hand-set default) was kept, and why."""
    cands = {c.get("name"): c for c in m.get("candidates") or []}
    chain, default = cands.get("chain"), cands.get("default")
    if not chain or not default:
        return ""
    if m.get("kept") == "chain":
        return (f"For the {label}, the chain of stage winners reached {pct(chain['val_acc'])} on validation "
                f"against {pct(default['val_acc'])} for the hand-set default, so the chain was kept: the short "
                f"grid's choices carried over to the full budget.")
    return (f"For the {label}, the hand-set default reached {pct(default['val_acc'])} on validation against "
            f"{pct(chain['val_acc'])} for the chain of stage winners, so the default was kept: the short grid's "
            f"choices did not carry over to the full budget.")


def kept_sentence(summary: dict) -> str:
    """How each track's final model was picked; the tracks whose chain is the default share one sentence."""
    labels = {"mlp": "MLP", "cnn": "CNN"}
    single = [labels[m] for m in labels if len(summary[m].get("candidates") or []) < 2]
    parts = [_kept_one(labels[m], summary[m]) for m in labels if labels[m] not in single]
    if single:
        which = "both tracks" if len(single) == 2 else f"the {single[0]}"
        parts.insert(0, f"For {which}, the chain of stage winners is the hand-set default configuration, so one "
                        f"candidate{' per track' if len(single) == 2 else ''} was trained at full budget.")
    return " ".join(p for p in parts if p)


def mcnemar_facts(results: dict, f: Facts) -> list[dict]:
    out = []
    for t in results["summary"].get("mcnemar") or []:
        p = t.get("p_value")
        if p is None:
            continue
        sig = p < 0.05
        f.claim(type="mcnemar", a=t["a"], b=t["b"], significant=sig)
        a_better = (t.get("acc_a") or 0) > (t.get("acc_b") or 0)
        better, other = (t["a"], t["b"]) if a_better else (t["b"], t["a"])
        a, b = _model_words(t["a"]), _model_words(t["b"])
        # n01: a wrong and b right; n10: a right and b wrong
        right_better, right_other = (t["n10"], t["n01"]) if a_better else (t["n01"], t["n10"])
        s = (f"Of the {t['n01'] + t['n10']} test images where they disagree, the {_model_words(better)} is right "
             f"on {right_better} and the {_model_words(other)} on {right_other}: a significant difference "
             f"(p = {p:.2g})."
             if sig else
             f"{a} and {b} disagree on {t['n01'] + t['n10']} images, split {t['n01']} to {t['n10']}, which is "
             f"consistent with chance (p = {p:.2g}): on this test set they are not distinguishable.")
        out.append({"row": [a, b, pct(t.get("acc_a")), pct(t.get("acc_b")), str(t["n10"]), str(t["n01"]),
                            f"{p:.2g}"], "sentence": s})
    return out


def _model_words(s: str) -> str:
    s = str(s)
    for raw, nice in (("chain", "chain of winners"), ("default", "hand-set default")):
        s = s.replace(raw, nice)
    return s.replace("mlp", "MLP").replace("cnn", "CNN")


def baseline_facts(results: dict) -> dict:
    s = results["summary"]
    rows = [[label, prep, pct(acc, 1)] for _m, label, prep, acc in BASELINES]
    mlp_ref = next(acc for m, _l, _p, acc in BASELINES if m == "mlp")
    small = [acc for m, label, _p, acc in BASELINES if m == "cnn" and "ResNet" not in label]
    ours_mlp, ours_cnn = s["mlp"]["test_acc"], s["cnn"]["test_acc"]
    sent = (f"Our MLP's {pct(ours_mlp)} is {'above' if ours_mlp > mlp_ref else 'below'} the listed MLP's "
            f"{pct(mlp_ref, 1)}; our CNN's {pct(ours_cnn)} is "
            + ("above every listed small CNN" if ours_cnn > max(small) else
               "below the best listed small CNN" if ours_cnn > min(small) else "below every listed small CNN")
            + " (those rows were submitted by their authors with their own splits and budgets, so the "
              "comparison is indicative only).")
    return {"rows": rows, "sentence": sent}


# ------------------------------------------------------------------------------------------ architecture
def mlp_layer_rows(cfg: dict) -> list[list[str]]:
    hidden = [int(h) for h in (cfg.get("hidden") or [])]
    act = name("mlp_activation", cfg.get("activation", "relu"))
    p = float(cfg.get("dropout") or 0)
    rows, d_in = [["input (flattened image)", "784", "0"]], 784
    for i, h in enumerate(hidden, 1):
        rows.append([f"linear {i}: {d_in} → {h}", str(h), f"{d_in * h + h:,}"])
        rows.append([act + (f", dropout {p:g}" if p else ""), str(h), "0"])
        d_in = h
    rows.append([f"linear {len(hidden) + 1}: {d_in} → 10 (logits)", "10", f"{d_in * 10 + 10:,}"])
    rows.append(["softmax + cross-entropy (fused)", "10", "0"])
    return rows


def cnn_layer_rows(cfg: dict) -> dict:
    """Layers of the final CNN by instantiating cnn_torch's backbone from the saved config and running one
    image through it with forward hooks (so the table is the real network)."""
    try:
        import torch
        import cnn_torch
        known = {fl.name for fl in __import__("dataclasses").fields(cnn_torch.CNNConfig)}
        net = cnn_torch.build_backbone(cnn_torch.CNNConfig(**{k: v for k, v in cfg.items() if k in known}))
    except Exception as exc:  # noqa: BLE001 - the report says why the table is missing
        return {"rows": [], "note": f"The backbone could not be rebuilt from the saved configuration ({type(exc).__name__})."}
    rows = []

    def hook(mod, _inp, out):
        n = sum(p.numel() for p in mod.parameters(recurse=False))
        rows.append([_describe(mod), " × ".join(str(d) for d in tuple(out.shape)[1:]), f"{n:,}"])

    hooks = [m.register_forward_hook(hook) for m in net.modules() if not list(m.children())]
    net.eval()
    with torch.no_grad():
        feats = net(torch.zeros(1, 1, 28, 28))
    for h in hooks:
        h.remove()
    dims = [int(feats.shape[1]), *[int(h) for h in cfg.get("head_hidden") or []], 10]
    act = name("mlp_activation", cfg.get("head_activation", "relu"))
    p = float(cfg.get("head_dropout") or 0)
    for k, (i, o) in enumerate(zip(dims[:-1], dims[1:]), 1):
        extra = "" if k == len(dims) - 1 else f", {act}" + (f", dropout {p:g}" if p else "")
        rows.append([f"scratch MLP head: linear {i} → {o}{extra}", str(o), f"{i * o + o:,}"])
    return {"rows": rows, "note": "", "feature_dim": str(dims[0]),
            "total": f"{sum(p.numel() for p in net.parameters()):,}"}


def _describe(mod) -> str:
    import torch.nn as nn
    if isinstance(mod, nn.Conv2d):
        return f"convolution {mod.in_channels} → {mod.out_channels}, {mod.kernel_size[0]}×{mod.kernel_size[1]}"
    if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
        k = mod.kernel_size if isinstance(mod.kernel_size, int) else mod.kernel_size[0]
        return f"{'max' if isinstance(mod, nn.MaxPool2d) else 'average'} pooling {k}×{k}"
    nice = {"ReLU": "ReLU", "BatchNorm2d": "BatchNorm", "AdaptiveAvgPool2d": "global average pooling",
            "Flatten": "flatten", "Dropout": "dropout"}
    return nice.get(type(mod).__name__, type(mod).__name__)


_GRADCHECK: dict = {}  # the checks depend on the code only: run them once per process


def gradcheck_facts(results_dir: Path) -> dict:
    """Run the gradient checks (about two seconds), save them to <results>/gradcheck.json, tabulate them."""
    try:
        from report import gradcheck
        if "data" not in _GRADCHECK:
            _GRADCHECK["data"] = gradcheck.run()
        data = _GRADCHECK["data"]
        atomic_write(results_dir / "gradcheck.json", json.dumps(data, indent=1).encode())
    except Exception as exc:  # noqa: BLE001 - a broken module shows in the report, it does not stop it
        return {"rows": [], "note": f"The gradient check could not run ({type(exc).__name__}: {exc})."}
    acts = list(dict.fromkeys(r["activation"] for r in data["rows"]))
    layers = sorted({r["layer"] for r in data["rows"]})
    cell = {(r["activation"], r["layer"]): r for r in data["rows"]}
    rows = [[name("mlp_activation", a)] + [f"{sci(cell[a, layer]['fd'])} / {sci(cell[a, layer]['torch'])}"
                                           for layer in layers] for a in acts]
    worst_fd = max(r["fd"] for r in data["rows"])
    worst_t = max((r["torch"] for r in data["rows"]), default=None)
    return {"rows": rows, "layers": [f"Layer {layer}" for layer in layers], "note": "",
            "shape": data["shape"], "worst_fd": sci(worst_fd), "worst_torch": sci(worst_t),
            "passes": worst_fd < 1e-6 and (worst_t is None or worst_t < 1e-10)}


# ------------------------------------------------------------------------------------------ views, errors
def view_facts(results: dict) -> dict:
    """PCA and mistakes summaries that plots.py saved beside the figures (figures/pca.json, mistakes.json)."""
    fig = results["dir"] / "figures"
    out = {"pca": "", "mistakes": "", "pca_n": "–"}
    try:
        pca = json.loads((fig / "pca.json").read_text())
        views = pca["views"]
        out["pca_n"] = count(pca.get("n"))
        best = max(views, key=lambda v: v["centroid_acc"])
        out["pca"] = ("In the 2-D projection, assigning each image to the nearest class mean classifies "
                      + _join([f"{pct(v['centroid_acc'], 0)} correctly from {v['title']}" for v in views])
                      + f": {best['title']} separate the classes best in two dimensions"
                        f" (PCA keeps {pct(best['variance'], 0)} of their variance).")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        mis = json.loads((fig / "mistakes.json").read_text())
        parts = [f"the {m.upper()} makes {v['n_wrong']:,} mistakes, {v['n_confident']:,} of them with "
                 f"confidence above {pct(v['threshold'], 0)}" for m, v in mis.items()]
        out["mistakes"] = "On the test set " + " and ".join(parts) + "."
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return out


def class_facts(results: dict, f: Facts) -> str:
    s = results["summary"]
    parts = []
    for model in ("mlp", "cnn"):
        pc, conf = s[model].get("per_class"), s[model].get("confusion")
        if not pc or not conf:
            continue
        worst = min(pc, key=lambda c: c["recall"])
        cm = np.asarray(conf, dtype=float)
        np.fill_diagonal(cm, -1)
        i, j = np.unravel_index(int(cm.argmax()), cm.shape)
        f.claim(type="confusion_max", model=model, true=int(i), pred=int(j))
        f.claim(type="worst_class", model=model, cls=worst["class"])
        parts.append(f"the {model.upper()} recognises {worst['class']} least often (recall {worst['recall']:.3f}) "
                     f"and most often mistakes {CLASS_NAMES[i]} for {CLASS_NAMES[j]} ({int(cm[i, j])} images)")
    if len(parts) < 2:
        return {"text": ("On the test set " + "; ".join(parts) + ".") if parts else "", "recall": ""}
    r_m = [c["recall"] for c in s["mlp"]["per_class"]]
    r_c = [c["recall"] for c in s["cnn"]["per_class"]]
    n = sum(c > m for m, c in zip(r_m, r_c))
    f.claim(type="recall_wins", n=n)
    return {"text": "On the test set " + "; ".join(parts) + ".",
            "recall": f"The CNN's recall is higher than the MLP's in {n} of the {len(r_m)} classes."}


# ------------------------------------------------------------------------------------------ conclusion
def _margin(kind: str | None) -> str:
    return {"default_clear": "by more than the seed noise", "other_clear": "by more than the seed noise",
            "default_close": "though within the seed noise", "other_close": "though within the seed noise"
            }.get(kind, "with no noise estimate")


def _best(stage: dict | None) -> str:
    """The level with the best mean validation accuracy (the outcome's, which the stage sentence names)."""
    return stage["best"] if stage and stage.get("kind") else "not measured"


def _within_cap(stage: dict | None) -> str:
    return " of the levels within the multiply-add cap" if stage and stage.get("capped") else ""


def _choice(stage: dict | None, what: str) -> str:
    """'the 3×3 kernel came first by more than the seed noise', or, where every other level is over the
    multiply-add cap, 'the ... was kept, as the only level within the multiply-add cap'."""
    if stage and stage.get("kind") == "only_default":
        return f"the {stage['best']} {what} was kept, as the only level within the multiply-add cap"
    return f"the {_best(stage)} {what} came first{_within_cap(stage)} {_margin((stage or {}).get('kind'))}"


def conclusion_facts(facts: dict, results: dict) -> list[list[str]]:
    """One sentence per assignment question: [question, sentence, label of the section with the evidence]."""
    st = {s["id"]: s for s in facts["studies_mlp"] + facts["studies_cnn"]}
    cfg = results["summary"]["mlp"]["config"]
    hidden = cfg.get("hidden") or []
    fm, fc = facts["final"]["mlp"], facts["final"]["cnn"]
    test = next((t for t in results["summary"].get("mcnemar") or []
                 if {"mlp", "cnn"} <= {str(t["a"]).lower(), str(t["b"]).lower()} and t.get("p_value") is not None), None)
    init_bn = st.get("cnn_init") or {}
    no_bn = facts["init"]["sentences"][0] if facts["init"]["sentences"] else ""
    return [
        ["Q2f", f"The MLP settles on {name('mlp_activation', cfg.get('activation'))}, {len(hidden)} hidden "
                f"layer{'s' if len(hidden) != 1 else ''} of {', '.join(map(str, hidden))} units, dropout "
                f"{_value(cfg.get('dropout'))} and {name('mlp_optimizer', cfg.get('optimizer'))} at a learning "
                f"rate of {_value(cfg.get('lr'))}, which reaches {fm['test_acc']} on test ({fm['seeds']}).",
         "sec-mlp-study"],
        ["Q3a", f"{_cap(_best(st.get('cnn_pool')))} came first among the pooling methods "
                f"{_margin((st.get('cnn_pool') or {}).get('kind'))}.", "sec-cnn-study"],
        ["Q3b", f"{_cap(_choice(st.get('cnn_kernel'), 'kernel'))}, and at equal multiply-adds "
                f"{_choice(st.get('cnn_filters'), 'filter schedule')}.", "sec-cnn-study"],
        ["Q3c", f"With BatchNorm {_best(init_bn)} initialisation came first {_margin(init_bn.get('kind'))}"
                + (f", while without it {no_bn[len('Without BatchNorm '):].rstrip('.')}."
                   if no_bn.startswith("Without BatchNorm") else
                   f"; {no_bn[0].lower() + no_bn[1:]}" if no_bn else "; the contrast without BatchNorm was not run."),
         "sec-init"],
        ["Q3d", f"The CNN backbone with the scratch MLP as its classifier reaches {fc['test_acc']} on test against "
                f"{fm['test_acc']} for the MLP on pixels"
                + (f", a difference McNemar's test puts at p = {test['p_value']:.2g}." if test else "."),
         "sec-final"],
    ]


# ------------------------------------------------------------------------------------------ design, curves
def _record(results: dict, key) -> dict:
    try:
        rec = json.loads((results["dir"] / "runs" / f"{key}.json").read_text())
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def same_work_spread(results: dict) -> str:
    """'10%': how much longer the slowest of the three initialisations with BatchNorm (the same arithmetic)
    ran than the fastest, in the grid's seconds; '' where the stage or its times are missing."""
    ratio = results["manifest"].get("stages", {}).get("cnn_init", {}).get("time_ratio")
    times = [ratio.get(v) for v in ("random", "xavier", "he")] if isinstance(ratio, dict) else []
    if len(times) < 3 or not all(isinstance(t, (int, float)) and t > 0 for t in times):
        return ""
    return f"{100 * (max(times) / min(times) - 1):.0f}%"


def design_facts(results: dict) -> dict:
    s, st = results["summary"], results["summary"]["study"]
    rec = _record(results, s["mlp"]["key"])
    budget = st.get("grid_budget") or {}
    words = {"subset": "training images", "n_eval": "validation images", "epochs": "epochs"}
    rows = [[_cap(k.replace("_", " ").replace("mlp", "MLP").replace("cnn", "CNN")),
             ", ".join(f"{words.get(kk, kk.replace('_', ' '))}: {'all' if vv is None else _value(vv)}"
                       for kk, vv in b.items()) if isinstance(b, dict) else _value(b)]
            for k, b in budget.items()] if isinstance(budget, dict) else []
    by_track = st.get("seeds") if isinstance(st.get("seeds"), dict) else {"": st.get("seeds") or []}
    by_track = {m: v for m, v in by_track.items() if isinstance(v, list) and v}
    seed_text = "; ".join(f"{m.upper()} {', '.join(map(str, v))}".strip() for m, v in by_track.items())
    fewest = min((len(v) for v in by_track.values()), default=0)
    return {"quick": st.get("plan") == "quick", "seeds": seed_text, "n_seeds": fewest,
            "one_seed": fewest < 2, "n_runs": count(st.get("n_runs")), "n_diverged": count(st.get("n_diverged")),
            "duration": _duration(st.get("seconds") or 0),  # summed run by run: resumes do not split it
            "workers": str(st.get("workers", 1)), "budget": rows,
            "macs_cap": f"{cap:g}" if isinstance(cap := results["manifest"].get("macs_cap"), (int, float)) else "",
            "same_work_spread": same_work_spread(results),
            "n_train": count(rec.get("n_train")), "n_val": count(rec.get("n_val")), "n_test": count(rec.get("n_test")),
            "versions": ", ".join(f"{k} {v}" for k, v in (st.get("versions") or {}).items()),
            "finished": str(st.get("finished_at", ""))}


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} hours" if seconds >= 5400 else f"{seconds / 60:.0f} minutes" if seconds >= 90 \
        else f"{seconds:.0f} seconds"


def _fit_words(gap: float, epochs_after_peak: int) -> str:
    """What the final train-validation gap and the epochs trained after the validation peak say about fit."""
    if gap <= 0.002:
        return "no better than validation: at this budget it underfits rather than overfits."
    if gap <= 0.02:
        return f"{pts(gap)} points above validation, so it does not overfit noticeably."
    if epochs_after_peak <= 1:
        return (f"{pts(gap)} points above validation; with the validation peak this close to the end, the gap "
                f"has not yet cost validation accuracy.")
    return (f"{pts(gap)} points above validation, and validation accuracy peaked {epochs_after_peak} epochs "
            f"before the end: the later epochs overfit, and the saved weights are those of the peak.")


def curve_facts(results: dict) -> dict:
    out = {}
    for model in ("mlp", "cnn"):
        hist = _record(results, results["summary"][model]["key"]).get("history") or []
        if not hist:
            out[model] = ""
            continue
        best = max(hist, key=lambda h: h["val_acc"])
        last = hist[-1]
        gap = last["train_acc"] - last["val_acc"]
        s = (f"The {model.upper()}'s validation accuracy peaks at {pct(best['val_acc'])} in epoch {best['epoch']} of "
             f"{last['epoch']}; at the end it fits its training images to {pct(last['train_acc'])}, "
             + _fit_words(gap, last["epoch"] - best["epoch"]))
        phases = [h.get("phase") for h in hist]
        start = next((h["epoch"] for p, h in zip(phases, hist[1:]) if h.get("phase") not in (None, p)), None)
        if start is not None:
            s += (f" The jump at epoch {start} is where the backbone's training ends and the scratch MLP head starts "
                  f"training on its frozen features (marked in the figure).")
        out[model] = s
    return out


# ------------------------------------------------------------------------------------------ group
def _bad(path, msg):
    return ReportError(f"{path}: {msg} (see the comments in report/group.toml)")


def _contribution(path, i, c) -> float | None:
    if c is None:
        return None
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        raise _bad(path, f"member {i}'s contribution must be a number, got {c!r}")
    if not math.isfinite(c) or c < 0:
        raise _bad(path, f"member {i}'s contribution must be a finite percentage >= 0, got {c!r}")
    return float(c)


def load_group(path=GROUP_FILE) -> dict:
    """Group name, members, contributions. A template (empty fields) gives placeholders; anything invalid
    (TOML syntax, wrong types, nan or negative contributions, a sum other than 100) raises ReportError."""
    path = Path(path)
    if not path.is_file():  # a mistyped --group-file would otherwise give a report of placeholders
        raise _bad(path, "no such file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise _bad(path, f"not valid TOML ({exc})") from None
    name_ = data.get("group_name", "")
    members = data.get("member", [])
    if not isinstance(name_, str):
        raise _bad(path, f"group_name must be a string, got {name_!r}")
    if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        raise _bad(path, "members must be [[member]] tables")
    shown, given = [], []
    for i, m in enumerate(members or [{}], 1):
        for k in ("name", "email"):
            if not isinstance(m.get(k, ""), str):
                raise _bad(path, f"member {i}'s {k} must be a string, got {m.get(k)!r}")
        c = _contribution(path, i, m.get("contribution"))
        given.append(c)
        shown.append({"name": m.get("name", "").strip() or f"[Member {i} name]",
                      "email": m.get("email", "").strip() or f"[member{i} email]",
                      "contribution": f"{c:g}%" if c is not None else "[contribution %]"})
    if any(c is not None for c in given):
        if any(c is None for c in given):
            raise _bad(path, "every member needs a contribution once one is given")
        if abs(sum(given) - 100) > 1e-6:
            raise _bad(path, f"contributions add up to {sum(given):g}%, not 100%")
    filled = bool(name_.strip()) and bool(members) and all(c is not None for c in given) and all(
        m.get("name", "").strip() and m.get("email", "").strip() for m in members)
    return {"name": name_.strip() or "[Group name]", "zip_name": name_.strip() or "group-name",
            "members": shown, "placeholder": not filled}


# ------------------------------------------------------------------------------------------ figures
def find_figures(results_dir: Path) -> tuple[dict, list[str]]:
    """{stem: {"file", "width" (inches)}} for the figures present, and the names of those missing. A figure
    that is there but damaged raises ReportError naming it (Typst's own error does not)."""
    import plots
    from PIL import Image, UnidentifiedImageError
    fig_dir = results_dir / "figures"
    present, missing = {}, []
    for fname, width in plots.FIG_WIDTH_IN.items():
        if not (fig_dir / fname).is_file():
            missing.append(fname)
            continue
        try:
            with Image.open(fig_dir / fname) as image:
                image.verify()  # the PNG's chunk checksums: a truncated or altered file fails here
        except (UnidentifiedImageError, SyntaxError, OSError) as e:
            raise ReportError(f"{fig_dir / fname} is damaged ({e}): redraw it with "
                              f"python plots.py --results-dir {results_dir}") from None
        present[Path(fname).stem] = {"file": fname, "width": width}
    return present, missing


# ------------------------------------------------------------------------------------------ all facts
def make_facts(results: dict, group: dict | None = None) -> dict:
    f = Facts()
    figures, missing = find_figures(results["dir"])
    s = results["summary"]
    facts = {"group": group or load_group(), "design": design_facts(results), "figures": figures,
             "missing_figures": missing, "noise_z": f"{NOISE_Z:g}",
             "studies_mlp": make_stage_facts(results, f, MLP_STAGES),
             "studies_cnn": make_stage_facts(results, f, CNN_STAGES),
             "edges": edge_sentence(results),
             "init": make_init_facts(results, f), "ablation": make_ablation_facts(results, f),
             "final": {m: final_facts(results, m, f) for m in ("mlp", "cnn")},
             "mcnemar": mcnemar_facts(results, f), "baselines": baseline_facts(results),
             "curves": curve_facts(results), "views": view_facts(results), "classes": class_facts(results, f),
             "mlp_layers": mlp_layer_rows(s["mlp"]["config"]), "cnn_layers": cnn_layer_rows(s["cnn"]["config"]),
             "gradcheck": gradcheck_facts(results["dir"])}
    facts["training"] = training_rows(s)
    facts["final"]["kept_sentence"] = kept_sentence(s)
    diff = s["cnn"]["test_acc"] - s["mlp"]["test_acc"]
    facts["final"]["cnn_minus_mlp"] = pts(abs(diff))
    facts["final"]["cnn_better"] = bool(diff > 0)
    f.claim(type="order", better="cnn" if diff > 0 else "mlp")
    facts["conclusion"] = conclusion_facts(facts, results)
    facts["claims"] = f.claims
    return facts


# ------------------------------------------------------------------------------------------ checks
# Each checker re-derives one kind of claim from the files (read afresh, with its own small computation)
# and returns a problem string or None. check_claims runs them all before any PDF is written.
def _level_stats(runs: pd.DataFrame, study: str) -> pd.DataFrame:
    df = runs[runs["study"].astype(str) == study]
    df = df[~df["diverged"].astype(str).str.lower().isin(["true", "1", "1.0"])]
    g = df.groupby(df["variant"].astype(str))["val_acc"]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()})


def _noise(st: pd.DataFrame, a: str, b: str) -> float | None:
    multi = st[(st["n"] > 1) & st["std"].notna()]
    dof = (multi["n"] - 1).sum()
    if dof <= 0:
        return None
    sd = math.sqrt(((multi["n"] - 1) * multi["std"] ** 2).sum() / dof)
    return NOISE_Z * sd * math.sqrt(1 / st.loc[a, "n"] + 1 / st.loc[b, "n"])


def check_stage(c: dict, files) -> str | None:
    st = _level_stats(files.runs(), c["study"])
    st = st[~st.index.isin(c["contrast"])]
    if c["default"] not in st.index or len(st) < 2:
        return f"{c['study']}: the runs no longer hold the default {c['default']}"
    best = c["default"] if st.loc[c["default"], "mean"] >= st["mean"].max() - 1e-9 else st["mean"].idxmax()
    other = c["default"] if best != c["default"] else st["mean"].drop(c["default"]).idxmax()
    noise = _noise(st, best, other)
    gap = st.loc[best, "mean"] - st.loc[other, "mean"]
    kind = ("default" if best == c["default"] else "other") + (
        "_clear" if noise is not None and gap > noise else "_close")
    if (best, kind) != (c["best"], c["kind"]):
        return f"{c['study']}: the runs give {best} first ({kind}), the report says {c['best']} ({c['kind']})"
    return None


def check_spread(c: dict, files) -> str | None:
    st = _level_stats(files.runs(), c["study"])
    st = st[st.index.isin(c["variants"])]
    lo, hi = st["mean"].idxmin(), st["mean"].idxmax()
    noise = _noise(st, lo, hi)
    clear = noise is not None and st.loc[hi, "mean"] - st.loc[lo, "mean"] > noise
    if (lo, hi, clear) != (c["low"], c["high"], c["clear"]):
        return f"{c['study']} without BatchNorm: the runs give {lo}..{hi} (clear={clear}), the report says " \
               f"{c['low']}..{c['high']} (clear={c['clear']})"
    return None


def check_ablation(c: dict, files) -> str | None:
    st = _level_stats(files.runs(), ABLATION)
    if c["variant"] not in st.index or c["full"] not in st.index:
        return f"ablation: {c['variant']} is missing from the runs"
    d = st.loc[c["variant"], "mean"] - st.loc[c["full"], "mean"]
    noise = _noise(st, c["variant"], c["full"])
    effect = "flat" if noise is None or abs(d) <= noise else ("hurt" if d < 0 else "helped")
    return None if effect == c["effect"] else f"ablation {c['variant']}: the runs say {effect}, the report {c['effect']}"


def check_summary(c: dict, files) -> str | None:
    got = files.summary()
    for k in c["path"]:
        got = got[k]
    ok = abs(float(got) - float(c["value"])) <= REL_TOL * max(1.0, abs(float(got)))
    return None if ok else f"summary {'.'.join(c['path'])} is {got}, the report says {c['value']}"


def check_order(c: dict, files) -> str | None:
    s = files.summary()
    better = "cnn" if s["cnn"]["test_acc"] > s["mlp"]["test_acc"] else "mlp"
    return None if better == c["better"] else f"the better test accuracy is the {better}'s, the report says {c['better']}'s"


def check_mcnemar(c: dict, files) -> str | None:
    t = next((t for t in files.summary().get("mcnemar", []) if (t["a"], t["b"]) == (c["a"], c["b"])), None)
    if t is None or (t["p_value"] < 0.05) != c["significant"]:
        return f"McNemar {c['a']} vs {c['b']}: significance differs from the report"
    return None


def check_classes(c: dict, files) -> str | None:
    m = files.summary()[c["model"]]
    if c["type"] == "worst_class":
        worst = min(m["per_class"], key=lambda x: x["recall"])["class"]
        return None if worst == c["cls"] else f"{c['model']} worst class is {worst}, the report says {c['cls']}"
    cm = np.asarray(m["confusion"], dtype=float)
    np.fill_diagonal(cm, -1)
    i, j = np.unravel_index(int(cm.argmax()), cm.shape)
    return None if (i, j) == (c["true"], c["pred"]) else f"{c['model']} largest confusion differs from the report"


def check_recall_wins(c: dict, files) -> str | None:
    s = files.summary()
    n = sum(b["recall"] > a["recall"] for a, b in zip(s["mlp"]["per_class"], s["cnn"]["per_class"]))
    return None if n == c["n"] else f"the CNN's recall is higher in {n} classes, the report says {c['n']}"


CHECKS = {"recall_wins": check_recall_wins, "stage": check_stage, "spread": check_spread, "ablation": check_ablation, "summary": check_summary,
          "order": check_order, "mcnemar": check_mcnemar, "worst_class": check_classes, "confusion_max": check_classes}


class _Files:
    """The results files, each read once, afresh (not the copies the facts were made from)."""

    def __init__(self, rd: Path):
        self.rd, self._runs, self._summary = rd, None, None

    def runs(self) -> pd.DataFrame:
        if self._runs is None:
            self._runs = pd.concat([pd.read_csv(self.rd / f"{m}_runs.csv") for m in ("mlp", "cnn")])
        return self._runs

    def summary(self) -> dict:
        if self._summary is None:
            self._summary = json.loads((self.rd / "summary.json").read_text())
        return self._summary


def check_claims(results_dir, facts: dict) -> None:
    """Re-derive every claim in facts["claims"]; raise ContradictionError listing the mismatches."""
    files = _Files(Path(results_dir))
    problems = []
    for c in facts["claims"]:
        try:
            p = CHECKS[c["type"]](c, files)
        except (KeyError, ValueError, TypeError, OSError) as exc:
            p = f"{c['type']} claim cannot be checked ({type(exc).__name__}: {exc})"
        if p:
            problems.append(p)
    if problems:
        distinct = list(dict.fromkeys(problems))  # one damaged column can fail many claims the same way
        raise ContradictionError(f"{len(problems)} statement(s) contradict {results_dir}: " + "; ".join(distinct[:5])
                                 + (f"; and {len(distinct) - 5} more" if len(distinct) > 5 else ""))


# ------------------------------------------------------------------------------------------ build


def compile_pdf(facts: dict, figures_dir: Path, out_pdf: Path) -> dict:
    """Compile in a scratch folder holding the source, facts.json and the figures (Typst reads files only
    under its root); the PDF replaces out_pdf atomically. Returns the page counts {"body", "total"}."""
    import typst
    with tempfile.TemporaryDirectory(prefix="report-build-") as tmp:
        tmp = Path(tmp)
        shutil.copy(TYP_SOURCE, tmp / "report.typ")
        shutil.copy(BIB_SOURCE, tmp / "references.bib")
        (tmp / "facts.json").write_text(json.dumps(facts, indent=1, default=str))
        (tmp / "figures").mkdir()
        for fig in facts["figures"].values():
            shutil.copy(figures_dir / fig["file"], tmp / "figures" / fig["file"])
        try:
            pdf = typst.compile(str(tmp / "report.typ"), root=str(tmp))
            pages = {k: json.loads(typst.query(str(tmp / "report.typ"), f"<{k}>", field="value", one=True,
                                               root=str(tmp))) for k in ("appendix-page", "last-page")}
        except Exception as exc:  # typst errors are long; the first line says where
            raise ReportError(f"typst could not compile report.typ: {str(exc).strip().splitlines()[0]}") from exc
    _write(out_pdf, pdf)
    body = pages["appendix-page"] - 1
    if body > MAX_BODY_PAGES or pages["last-page"] > MAX_PAGES:
        print(f"warning: the report has {body} pages before the appendix and {pages['last-page']} in all "
              f"(limits {MAX_BODY_PAGES} and {MAX_PAGES})", file=sys.stderr)
    return {"body": body, "total": pages["last-page"]}


def default_pdf(results_dir) -> Path:
    """report/report.pdf for the repository's results/, else <results_dir>/report.pdf (so that a quick or
    test study never overwrites the committed report)."""
    rd = Path(results_dir).resolve()
    return REPORT_DIR / "report.pdf" if rd == (REPO_DIR / "results").resolve() else rd / "report.pdf"


def build_report(results_dir="results", out_pdf=None, group_file=GROUP_FILE, facts_out=None) -> Path:
    """Read results_dir, compute the facts, check them against the CSVs, compile the PDF; return its path.
    facts_out: also write facts.json there (tests read it)."""
    results_dir = Path(results_dir)
    out_pdf = Path(out_pdf) if out_pdf is not None else default_pdf(results_dir)
    group = load_group(group_file)
    if group["placeholder"]:
        print(f"warning: {group_file} is not filled in (group name, names, e-mails, contributions): "
              f"the report shows placeholders", file=sys.stderr)
    results = load_results(results_dir)
    try:
        facts = make_facts(results, group)
    except (KeyError, TypeError, AttributeError) as exc:  # a damaged file: say which, in one line
        raise ReportError(f"{results_dir}'s summary.json, manifest.json or CSVs do not have the expected shape "
                          f"({type(exc).__name__}: {exc}): rebuild them with `python run_experiments.py "
                          f"--plots-only --results-dir {results_dir}`") from exc
    check_claims(results_dir, facts)
    if facts["missing_figures"]:
        print(f"warning: figures missing from {results_dir / 'figures'}: {', '.join(facts['missing_figures'])} "
              f"(redraw them with `python plots.py --results-dir {results_dir}`)", file=sys.stderr)
    if facts["design"]["quick"]:
        print("warning: these are --quick results: the numbers are not the study's", file=sys.stderr)
    facts["pages"] = compile_pdf(facts, results_dir / "figures", out_pdf)
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
    p.add_argument("--results-dir", type=path_arg, default="results",
                   help="the study's output folder (default: results)")
    p.add_argument("--out", type=path_arg, default=None, help="PDF to write (default: report/report.pdf for results/, "
                                               "else <results-dir>/report.pdf)")
    p.add_argument("--group-file", type=path_arg, default=str(GROUP_FILE),
                   help="group details (default: report/group.toml)")
    p.add_argument("--facts", type=path_arg, default=None, help="also write the computed facts.json here")
    args = p.parse_args(argv)
    print(f"wrote {build_report(args.results_dir, args.out, args.group_file, args.facts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
