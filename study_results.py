"""Storage of the study: run records, the results lock, and the tables and summary rebuilt from them.

    runs/<key>.json            one record per finished run (Registry.add; fields: RECORD below)
    models/runs/<key>.npz      the model of a final MLP run; models/runs/<key>/ the files of a final CNN run
    manifest.json              which runs make up each comparison and what each stage decided (run_experiments)
    mlp_runs.csv, cnn_runs.csv, finals.csv, curves.csv, summary.json, models/mlp_best.npz, models/cnn_best/
                               rebuilt from the records and manifest.json only (rebuild_outputs)

Every file is written atomically (cli.atomic_write), so a crash, a full disk or a second process never leaves
half a file behind. A damaged record (not JSON, not an object, a missing key, a wrong type) is set aside as
`<name>.bad` with one warning naming it, and its run counts as not done, so the study trains it again; so
does a final run whose model file is gone. `load_runs` is the one reader of run records for everyone else.
"""
import contextlib
import csv
import io
import json
import math
import os
import platform
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

import cli
from preprocessing import CLASS_NAMES, NUM_CLASSES

MODELS = ("mlp", "cnn")
ROLES = ("grid", "ablation", "final", "heads")
STALE_TMP_SECONDS = 60.0  # a temporary file this old belongs to no live writer (writes take < 1 s)


class StudyError(cli.UserError):
    """A folder in use, results that cannot be rebuilt, a bad plan: one line, exit 1."""


# ------------------------------------------------------------------------------------------ JSON
def clean(x):
    """JSON-ready copy: NaN/inf -> None, numpy scalars and arrays -> Python, tuples -> lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, (np.ndarray, np.generic)):
        return clean(x.tolist())
    return str(x) if isinstance(x, Path) else x


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def loads(text: str):
    """Strict JSON: NaN / Infinity are refused (ValueError), as every JSON reader but Python's does."""
    return json.loads(text, parse_constant=_refuse_constant)


def write_json(path, obj) -> None:
    cli.atomic_write(path, json.dumps(clean(obj), indent=1, allow_nan=False) + "\n")


def read_json(path, log: Callable = print, what: str = "ignored"):
    """Strict JSON of a file, or None (with one warning if it is there but unreadable)."""
    if not Path(path).exists():
        return None
    try:
        return loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        log(f"warning: {path} is not readable JSON ({str(e).splitlines()[0]}): {what}")
        return None


# ------------------------------------------------------------------------------------------ the lock
@contextlib.contextmanager
def results_lock(results_dir):
    """Exclusive lock on a results folder (`<results_dir>/.lock`, fcntl.flock), so two studies never train
    the same runs twice; a second holder gets a StudyError naming the first (pid, host, start time). The
    lock ends with the process, even on SIGKILL; the file stays, emptied (deleting it would race)."""
    import fcntl
    path = Path(results_dir) / ".lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise StudyError(f"cannot lock {results_dir}: {e.strerror} ({path})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        info = read_json(path, lambda *a: None)
        who = (f"pid {info['pid']} on {info['host']} since {info['since']}"
               if isinstance(info, dict) and {"pid", "host", "since"} <= set(info) else "another process")
        raise StudyError(f"{results_dir} is in use by {who}; wait for it or stop it") from None
    try:
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor drops the flock


# ------------------------------------------------------------------------------------------ run records
def _number(lo=-math.inf, hi=math.inf):
    """A finite number in [lo, hi]."""
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi


def _opt(check):
    """The check, or None."""
    return lambda v: v is None or check(v)


def _is(kind):
    return lambda v: isinstance(v, kind) and not (kind is int and isinstance(v, bool))


def _list_of(check):
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


_NAME, _FRACTION, _COUNT = (lambda v: isinstance(v, str) and v != ""), _opt(_number(0, 1)), _opt(_number(0))
_RELATIVE = lambda v: isinstance(v, str) and not os.path.isabs(v) and ".." not in Path(v).parts  # noqa: E731
# The run record, field by field: its check (an optional field may be None). The one description of it.
RECORD_REQUIRED = ("key", "model", "study", "variant", "seed", "role", "config", "val_acc", "diverged")
RECORD: dict[str, Callable] = {
    # key: 12 hex digits hashing what decides the run's numbers (model, config, budget, final or not); its file name
    "key": lambda v: _NAME(v) and "/" not in v and not v.startswith("."), "model": lambda v: v in MODELS,
    # study: the stage or final it was trained for (mlp_lr, cnn_final); variant: the level's label, e.g. 0.003,
    # or a final candidate's name (chain, start)
    "study": _NAME, "variant": _is(str), "seed": lambda v: _is(int)(v) and v >= 0,
    # role: grid | ablation | final | heads (only finals see the test set); config: the module config it
    # trained (MLPConfig / CNNConfig); val_acc: validation accuracy at the best epoch (None if it diverged)
    "role": lambda v: v in ROLES, "config": _is(dict), "val_acc": _FRACTION,
    # diverged: training stopped on a non-finite or exploding loss; final: role == final
    "diverged": _is(bool), "final": _opt(_is(bool)),
    # plan: the study plan it belongs to; budget: {subset, n_eval, epochs}, its training images and epochs
    "plan": lambda v: v in (None, "full", "quick"), "budget": _opt(_is(dict)),
    # training accuracy at the best epoch; finals only: test accuracy and macro-averaged F1
    **dict.fromkeys(("train_acc", "test_acc", "test_macro_f1"), _FRACTION),
    # losses at the best epoch (a diverged run's may be huge)
    **dict.fromkeys(("train_loss", "val_loss", "test_loss"), _opt(_number())),
    # wall seconds of the run and of a mean epoch, trainable parameters, multiply-adds per image, epochs
    # trained (early stopping may end sooner), the epoch whose weights were kept, images, BLAS/torch threads
    **dict.fromkeys(("seconds", "sec_per_epoch", "n_params", "macs", "epochs_run", "best_epoch", "n_train", "n_val",
                     "n_test", "threads"), _COUNT),
    # per epoch: epoch, phase, lr, train_loss, train_acc, val_loss, val_acc, seconds
    "history": _opt(_list_of(_is(dict))),
    # finals only: the predicted class per test image, its model (relative to the results folder), every file
    "test_pred": _opt(_list_of(lambda p: _is(int)(p) and 0 <= p < NUM_CLASSES)),
    "model_file": _opt(_RELATIVE), "model_files": _opt(_list_of(_RELATIVE)),
    "error": _opt(_is(str)),  # why it diverged
}
# Also written, not checked: device, finished_at, layer_stats, test_true, test_prob_max, per_class, confusion.


def faults(obj, checks: dict[str, Callable], required=()) -> str | None:
    """Why `obj` does not fit its table of checks (one phrase), or None: the one check of run records and of the
    manifest's parts. A field not in `required` may be absent."""
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not an object"
    missing = [k for k in required if k not in obj]
    bad = [k for k, ok in checks.items() if k in obj and not ok(obj[k])]
    return "; ".join(f"{what} {', '.join(keys)}" for what, keys in
                     (("missing", missing), ("wrong type or value of", bad)) if keys) or None


def record_problem(rec) -> str | None:
    """Why `rec` is not a usable run record (one phrase), or None if it is."""
    if problem := faults(rec, RECORD, RECORD_REQUIRED):
        return problem
    if rec["val_acc"] is None and not rec["diverged"]:
        return "no val_acc for a run that did not diverge"
    if rec["role"] == "final" and not rec["diverged"]:
        if need := [k for k in ("model_file", "test_acc", "test_pred") if rec.get(k) is None]:
            return "a final run without " + ", ".join(need)
        if rec.get("n_test") is not None and len(rec["test_pred"]) != rec["n_test"]:
            return f"{len(rec['test_pred'])} test predictions for {rec['n_test']} test images"
    return None


def _remove_stale_temporaries(folder: Path, log: Callable) -> None:
    """Temporary files left by a killed writer (`*.tmp*`, any depth), older than STALE_TMP_SECONDS."""
    for p in folder.rglob(f"*{cli.TMP_SUFFIX}*") if folder.is_dir() else ():
        try:
            if time.time() - p.lstat().st_mtime >= STALE_TMP_SECONDS:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError as e:
            log(f"warning: could not remove the leftover temporary file {p}: {e.strerror}")


class Registry:
    """The finished runs of a results folder (`runs/<key>.json`), keyed by run key: the one reader of records.

    `key in registry` is True only for a valid record, and for a final run only while its model file
    exists: a damaged record is set aside (renamed `<name>.bad`, `<name>.1.bad`, ...; one warning) and a
    final run without its model is redone. `records` holds the usable records; `set_aside` and
    `missing_models` say what was skipped. read_only (plots, the report): damaged records are skipped with a
    warning, nothing is renamed or removed, and final runs count without their model files.
    """

    def __init__(self, results_dir, log: Callable = print, read_only: bool = False):
        self.results_dir, self.dir = Path(results_dir), Path(results_dir) / "runs"
        self.log, self.read_only = log, read_only
        self.records: dict[str, dict] = {}
        self.set_aside: list[str] = []            # file names renamed to .bad (or skipped, read_only)
        self.missing_models: dict[str, str] = {}  # key -> model file not found (the run is redone)
        if not read_only:
            _remove_stale_temporaries(self.dir, log)
            _remove_stale_temporaries(self.results_dir / "models", log)
        for p in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else ():
            self._load(p)

    def model_present(self, rec: dict) -> bool:
        """Every model file of a final run exists (model_files when recorded, else model_file)."""
        if self.read_only or rec["role"] != "final" or rec["diverged"]:
            return True
        paths = [self.results_dir / rel for rel in rec.get("model_files") or [rec["model_file"]]]
        return all(p.exists() and not (p.is_dir() and not any(p.iterdir())) for p in paths)

    def _load(self, p: Path) -> None:
        try:
            rec = loads(p.read_text(encoding="utf-8"))
            problem = record_problem(rec)
            if problem is None and rec["key"] != p.stem:  # a copy under another name: not the run it names
                problem = f"it holds run {rec['key']}, not {p.stem}"
        except UnicodeDecodeError:
            problem = "not text"
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            problem = f"not valid JSON ({e})"
        except OSError as e:
            self.log(f"warning: cannot read run record {p}: {e.strerror}; its run counts as not done")
            return
        if problem is not None:
            self.set_aside.append(p.name)
            self.log(f"warning: damaged run record {p} ({problem}): "
                     f"{'skipped' if self.read_only else self._set_aside(p)}")
        elif not self.model_present(rec):
            self.log(f"warning: the model of final run {rec['key']} ({rec.get('model_file')}) is missing; "
                     f"the run will be redone")
            self.missing_models[rec["key"]] = rec.get("model_file") or ""
        else:
            self.records[rec["key"]] = {**rec, "final": rec["role"] == "final"}

    def _set_aside(self, path: Path) -> str:
        """Rename a damaged record to `<name>.bad` (`<name>.1.bad`, ... if taken); what became of it."""
        dest, i = path.with_name(path.name + ".bad"), 1
        while dest.exists():
            dest, i = path.with_name(f"{path.name}.{i}.bad"), i + 1
        try:
            os.replace(path, dest)
        except OSError:
            return "could not be renamed; the run will be redone"
        return f"set aside as {dest.name}; the run will be redone"

    def __contains__(self, key) -> bool:
        return key in self.records

    def add(self, record: dict, model_files: dict[str, bytes] | None = None) -> None:
        """Save one finished run: each model file first (paths relative to the results folder, e.g.
        "models/runs/<key>.npz"), then the record, all atomically, so a crash never leaves a record
        without its model. NaN becomes null. A record that breaks the
        schema is a bug of the caller: ValueError, nothing written."""
        rec = clean({**record, "final": record.get("role") == "final"})
        if model_files:
            rec["model_files"] = sorted(model_files)
        if problem := record_problem(rec):
            raise ValueError(f"run record {rec.get('key')!r}: {problem}")
        for rel, data in (model_files or {}).items():
            cli.atomic_write(self.results_dir / rel, data)
        write_json(self.dir / f"{rec['key']}.json", rec)
        self.records[rec["key"]] = rec


def load_runs(results_dir, log: Callable = print) -> tuple[list[dict], dict]:
    """The one reader of saved results for plots and the report: (the runs as members of their comparisons
    (study_records), the manifest (load_manifest)). Read only: a damaged record is skipped with a warning,
    never renamed; the stage decisions are manifest["stages"][study] (winner, rows, sd, mdd)."""
    manifest = load_manifest(results_dir, log)
    return study_records(Registry(results_dir, log, read_only=True).records, manifest), manifest


# ------------------------------------------------------------------------------------------ statistics
# Student t quantiles by degrees of freedom: 0.975 (two-sided 95% interval, 5% test) and 0.80 (80% power).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
T80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889, 9: 0.883, 10: 0.879}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95% for z = 1.96); (0, 1) when n = 0. Unlike the
    normal approximation it stays inside [0, 1] and is sensible near 0 and 1."""
    if n <= 0:
        return 0.0, 1.0
    p, denom = k / n, 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar(pred_a, pred_b, y) -> dict:
    """McNemar's test of two classifiers on the same images. n01: images A gets wrong and B right; n10:
    A right and B wrong. Two-sided p-value: the exact binomial test (n = n01 + n10, p = 1/2) when
    n < 25, else chi-square with continuity correction, x = (|n01 - n10| - 1)^2 / n, p = erfc(sqrt(x/2))
    (the chi-square(1) tail)."""
    pred_a, pred_b, y = (np.asarray(v).ravel() for v in (pred_a, pred_b, y))
    if not (len(pred_a) == len(pred_b) == len(y)):
        raise ValueError(f"mcnemar needs predictions of the same images: {len(pred_a)}, {len(pred_b)}, {len(y)}")
    right_a, right_b = pred_a == y, pred_b == y
    n01, n10 = int(np.sum(~right_a & right_b)), int(np.sum(right_a & ~right_b))
    n = n01 + n10
    if n < 25:  # n = 0 included: p = 1
        tail = sum(math.comb(n, i) for i in range(min(n01, n10) + 1))  # exact, integers
        p = min(1.0, 2 * tail / 2 ** n)
    else:
        p = math.erfc(math.sqrt(max(abs(n01 - n10) - 1, 0) ** 2 / n / 2))
    return {"n01": n01, "n10": n10, "p_value": float(p)}


def mean(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def sample_std(vals) -> float | None:
    """Sample std (ddof=1); None for fewer than two values (one seed has no spread), never NaN."""
    return float(np.std(vals, ddof=1)) if len(vals) >= 2 else None


def study_table(records: list[dict], study: str, levels: list[str] | None = None) -> list[dict]:
    """Per variant of one study (in `levels` order, then first-seen order): the number of runs n, mean
    and std over seeds of val_acc and train_acc (runs that diverged left out of the means; std None
    if fewer than 2), mean n_params, macs and seconds, and how many runs diverged."""
    groups: dict[str, list[dict]] = {v: [] for v in (levels or [])}
    for r in records:
        if r["study"] == study:
            groups.setdefault(r["variant"], []).append(r)
    out = []
    for variant, recs in ((v, rs) for v, rs in groups.items() if rs):
        row = {"variant": variant, "n": len(recs)}
        for m in ("val_acc", "train_acc"):
            vals = [r[m] for r in recs if not r["diverged"] and r.get(m) is not None]
            row[m], row[m + "_std"] = mean(vals), sample_std(vals)
        for m in ("n_params", "macs", "seconds", "sec_per_epoch"):
            v = mean([r.get(m) for r in recs])
            row[m] = int(round(v)) if v is not None and m in ("n_params", "macs") else v
        row["diverged"] = sum(bool(r["diverged"]) for r in recs)
        out.append(row)
    return out


def classification_report(y_true, y_pred, class_names=CLASS_NAMES) -> dict:
    """Confusion matrix (rows = true class), per-class precision / recall / f1 and macro-F1."""
    k = len(class_names)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    tp = np.diag(cm).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 (a class never predicted, never true): 0
        precision, recall = np.nan_to_num(tp / cm.sum(0)), np.nan_to_num(tp / cm.sum(1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return {"test_macro_f1": float(f1.mean()),
            "per_class": [{"class": class_names[c], "precision": float(precision[c]),
                           "recall": float(recall[c]), "f1": float(f1[c])} for c in range(k)],
            "confusion": cm.tolist()}


# ------------------------------------------------------------------------------------------ manifest
# The manifest's parts: (part, its JSON type, the check of each item, the fields an item must have).
RUN_ROW = ("model", "study", "variant", "seed", "key", "role")  # in this order, RunSpec.row()
MANIFEST_PARTS = (
    ("runs", list, {k: RECORD[k] for k in RUN_ROW}, RUN_ROW),
    ("stages", dict, {"levels": _opt(_list_of(_is(str)))}, ()),
    ("finals", dict, {"candidates": lambda v: isinstance(v, dict) and all(_list_of(_is(str))(k) for k in v.values()),
                      "kept": _NAME, "seeds": _list_of(_is(str))}, ("candidates", "kept", "seeds")))


def load_manifest(results_dir, log: Callable = print) -> dict:
    """manifest.json with every part checked: a damaged file, or a damaged part of it (a run row, a
    stage, a final), is left out with one warning. Always has "runs", "stages", "finals"."""
    path = Path(results_dir) / "manifest.json"
    raw = read_json(path, log, "ignored: the tables and summary get no stages and no finals")
    problems = [] if isinstance(raw, dict) or raw is None else [f"a JSON {type(raw).__name__}, not an object"]
    out = dict(raw) if isinstance(raw, dict) else {}
    for part, kind, checks, required in MANIFEST_PARTS:
        got = out.get(part, kind())
        if not isinstance(got, kind):
            problems.append(f"{part} is not a JSON {kind.__name__}")
            got = kind()
        items = dict(enumerate(got)) if kind is list else got
        good = {k: v for k, v in items.items() if not faults(v, checks, required) and (part != "finals" or k in MODELS)}
        out[part] = list(good.values()) if kind is list else good
        if len(good) < len(items):
            problems.append(f"damaged {part}: " + ", ".join(sorted(map(str, set(items) - set(good)))))
    if problems:
        log(f"warning: {path}: " + "; ".join(problems) + ": those parts ignored")
    return out


def study_records(records: dict[str, dict], manifest: dict) -> list[dict]:
    """The runs as members of their comparisons: one row per manifest row whose run is done (a run shared
    by two stages, the incumbent level, appears in both, relabelled); runs the manifest does not list
    (or every run, without a manifest) under their own labels."""
    listed = [row for row in manifest.get("runs", []) if row["key"] in records]
    keys = {row["key"] for row in listed}
    return ([{**records[row["key"]], "study": row["study"], "variant": row["variant"], "role": row["role"]}
             for row in listed] + [rec for key, rec in records.items() if key not in keys])


# ------------------------------------------------------------------------------------------ finals
def _candidates(records: dict[str, dict], manifest: dict, model: str) -> dict | None:
    """{"kept": name, "runs": {name: its records by seed}, "seeds": the kept candidate's usable records} from the
    manifest's finals; None when the track has no usable final."""
    spec = manifest["finals"].get(model, {})
    runs = {name: sorted((records[k] for k in keys if k in records), key=lambda r: r["seed"])
            for name, keys in spec.get("candidates", {}).items()}
    seeds = [r for r in runs.get(spec.get("kept"), []) if not r["diverged"]]
    return {"kept": spec["kept"], "runs": runs, "seeds": seeds, "same": spec.get("same", {})} if seeds else None


def _wilson_of(rec: dict) -> list[float] | None:
    n = int(rec.get("n_test") or len(rec.get("test_pred") or []))
    return list(wilson_interval(round(rec["test_acc"] * n), n)) if n and rec.get("test_acc") is not None else None


def paired_difference(a: list[dict], b: list[dict], field: str = "val_acc") -> dict | None:
    """Mean of a's minus b's `field` over the seeds both ran, with its 95% t interval (None with one seed)."""
    by_seed = {r["seed"]: r.get(field) for r in b}
    d = [r[field] - by_seed[r["seed"]] for r in a if r.get(field) is not None and by_seed.get(r["seed"]) is not None]
    if not d:
        return None
    half = T975.get(len(d) - 1, 1.96) * sample_std(d) / math.sqrt(len(d)) if len(d) > 1 else None
    return {"n": len(d), "diff": float(np.mean(d)),
            "ci": None if half is None else [np.mean(d) - half, np.mean(d) + half]}


def _seed_row(r: dict) -> dict:
    return {"seed": r["seed"], "key": r["key"], "val_acc": r["val_acc"], "test_acc": r.get("test_acc"),
            "train_acc": r.get("train_acc"), "seconds": r.get("seconds"), "diverged": r["diverged"],
            "test_acc_wilson95": _wilson_of(r)}


def _model_summary(c: dict) -> dict:
    rec = c["seeds"][0]  # the seed whose model is saved as models/<model>_best
    seed_accs = [r["test_acc"] for r in c["seeds"] if r.get("test_acc") is not None]
    return {
        **{k: rec.get(k) for k in ("test_acc", "val_acc", "test_macro_f1", "per_class", "confusion", "config", "key")},
        "kept": c["kept"], "same": c["same"], "train_seconds": rec.get("seconds"),
        **{k: rec.get(k) for k in ("epochs_run", "precision", "n_params", "macs", "n_test")},
        "test_acc_wilson95": _wilson_of(rec), "seeds": [_seed_row(r) for r in c["seeds"]],
        "val_acc_mean": mean([r["val_acc"] for r in c["seeds"]]),
        "test_acc_mean": mean(seed_accs), "test_acc_std": sample_std(seed_accs),
        "candidates": [{"name": name, "config": rs[0]["config"], "seeds": [_seed_row(r) for r in rs],
                        "val_acc_mean": mean([r["val_acc"] for r in rs]),
                        "test_acc_mean": mean([r.get("test_acc") for r in rs]),
                        "val_diff_to_kept": paired_difference(rs, c["runs"][c["kept"]])}
                       for name, rs in c["runs"].items() if rs],
    }


# ------------------------------------------------------------------------------------------ summary.json
def _study_facts(recs: list[dict], manifest: dict, previous, wall_seconds, workers) -> dict:
    from importlib import metadata
    versions = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform()}
    for name in ("torch", "pandas", "matplotlib"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    budgets: dict[str, list] = {}  # the training budget of each kind of run; a list where runs differ
    for r in recs:
        if isinstance(r.get("budget"), dict) and r["budget"] not in budgets.setdefault(f"{r['model']}_{r['role']}", []):
            budgets[f"{r['model']}_{r['role']}"].append(r["budget"])
    prev = previous.get("study") if isinstance(previous, dict) else None
    prev = prev if isinstance(prev, dict) else {}
    finished = [r["finished_at"] for r in recs if isinstance(r.get("finished_at"), str)]
    return {
        "plan": manifest.get("plan"), "seeds": manifest.get("seeds"),
        "grid_budget": {k: v[0] if len(v) == 1 else v for k, v in budgets.items()},
        "n_runs": len(recs), "n_diverged": sum(bool(r["diverged"]) for r in recs),
        "seconds": float(sum(r.get("seconds") or 0.0 for r in recs)),
        "wall_seconds": wall_seconds if wall_seconds is not None else prev.get("wall_seconds"),
        "workers": workers if workers is not None else prev.get("workers"),
        "finished_at": max(finished) if finished else None, "versions": versions}


def write_summary(results_dir: Path, rows: list[dict], records: dict[str, dict], manifest: dict, cands: dict,
                  wall_seconds, workers, log: Callable) -> dict:
    """summary.json from the records, the manifest and the finals' candidates (each stage: its manifest entry,
    decision included, with its table of levels); returns it."""
    summary: dict = {m: _model_summary(c) for m, c in cands.items()}
    tests = [("MLP", "CNN", cands["mlp"]["seeds"][0], cands["cnn"]["seeds"][0])] if len(cands) == 2 else []
    tests += [(f"{m.upper()} chain", f"{m.upper()} start", c["runs"]["chain"][0], c["runs"]["start"][0])
              for m, c in cands.items() if c["runs"].get("chain") and c["runs"].get("start")]
    summary["mcnemar"] = []
    for a, b, ra, rb in tests:
        if ra.get("test_true") is None or ra["test_true"] != rb.get("test_true"):
            log(f"warning: no McNemar test {a} vs {b}: their runs do not record the same test labels")
        else:
            summary["mcnemar"].append({"a": a, "b": b, "a_key": ra["key"], "b_key": rb["key"],
                                       **mcnemar(ra["test_pred"], rb["test_pred"], ra["test_true"]),
                                       "acc_a": ra["test_acc"], "acc_b": rb["test_acc"]})
    # Q3d at full budget: per head training mode, its runs' validation accuracy (and for frozen runs the linear
    # head's that trained the backbone), seconds, and the backbone phase's seconds
    heads = manifest["finals"].get("cnn", {}).get("heads")
    summary["heads"] = {mode: [{**_seed_row(records[k]), "linear_val_acc": records[k].get("linear_val_acc"),
                                "backbone_seconds": records[k].get("backbone_seconds")} for k in keys if k in records]
                        for mode, keys in heads.items()} if heads else None
    summary["stages"] = {study: {**st, "table": study_table(rows, study, st.get("levels"))}
                         for study, st in manifest["stages"].items()}
    summary["ablation"] = study_table(rows, "cnn_ablation", manifest["stages"].get("cnn_ablation", {}).get("levels"))
    previous = read_json(results_dir / "summary.json", log, "its wall_seconds and workers are not kept")
    summary["study"] = _study_facts(list(records.values()), manifest, previous, wall_seconds, workers)
    write_json(results_dir / "summary.json", summary)
    return summary


# ------------------------------------------------------------------------------------------ tables
RUN_COLUMNS_HEAD = ["study", "variant", "seed", "role", "plan"]
# never a test column: grid runs see no test set
RUN_COLUMNS_TAIL = ["budget_subset", "budget_epochs", "n_train", "n_val", "epochs_run", "best_epoch", "train_loss",
                    "train_acc", "val_loss", "val_acc", "val_acc_unmirrored", "seconds", "sec_per_epoch", "threads",
                    "device", "n_params", "macs", "diverged", "key", "error"]
FINALS_COLUMNS = ["model", "study", "variant", "seed", "candidate", "kept", "key", "plan", "val_acc",
                  "train_acc", "test_loss", "test_acc", "test_macro_f1", "test_acc_wilson_lo",
                  "test_acc_wilson_hi", "n_test", "seconds", "epochs_run", "n_params", "macs", "diverged"]
CURVE_COLUMNS = ["key", "study", "variant", "seed", "role", "epoch", "phase", "lr", "train_loss", "train_acc",
                 "val_loss", "val_acc", "seconds"]


def _cell(v):  # None: csv writes an empty cell
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v)) if v else "none"
    return json.dumps(v, sort_keys=True) if isinstance(v, dict) else v


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([columns, *([_cell(row.get(c)) for c in columns] for row in rows)])
    cli.atomic_write(path, buf.getvalue())


def write_tables(results_dir: Path, rows: list[dict], records: dict[str, dict], cands: dict) -> None:
    """mlp_runs.csv, cnn_runs.csv (every run, no test columns), finals.csv (final runs with their test
    accuracy and its Wilson interval), curves.csv (per-epoch history)."""
    fixed = RUN_COLUMNS_HEAD + RUN_COLUMNS_TAIL
    for model in MODELS:
        recs = [r for r in rows if r["model"] == model]
        cfg_cols = list(dict.fromkeys(k for r in recs for k in r["config"] if k not in ("seed", "device", *fixed)))
        write_csv(results_dir / f"{model}_runs.csv", RUN_COLUMNS_HEAD + cfg_cols + RUN_COLUMNS_TAIL,
                  [{**{k: r["config"].get(k) for k in cfg_cols}, **{k: r.get(k) for k in fixed},
                    **{f"budget_{k}": v for k, v in (r.get("budget") or {}).items()}} for r in recs])
    names = {r["key"]: name for c in cands.values() for name, rs in c["runs"].items() for r in rs}
    kept = {r["key"] for c in cands.values() for r in c["seeds"]}
    finals = sorted((r for r in records.values() if r["role"] == "final"),
                    key=lambda r: (MODELS.index(r["model"]), r["variant"], r["seed"]))
    write_csv(results_dir / "finals.csv", FINALS_COLUMNS,
              [{**r, "candidate": names.get(r["key"]), "kept": r["key"] in kept,
                **dict(zip(("test_acc_wilson_lo", "test_acc_wilson_hi"), _wilson_of(r) or [None, None]))}
               for r in finals])
    write_csv(results_dir / "curves.csv", CURVE_COLUMNS,
              [{**h, "key": r["key"], "study": r["study"], "variant": r["variant"], "seed": r["seed"],
                "role": r["role"]} for r in rows for h in r.get("history") or []])


def copy_best_models(results_dir: Path, cands: dict) -> None:
    """models/mlp_best.npz and models/cnn_best/: copies of the kept final models (seed 0), atomically. Their
    files are there: the registry counts a final run without them as not done."""
    for model, c in cands.items():
        src = results_dir / c["seeds"][0]["model_file"]
        dest = results_dir / "models" / {"mlp": "mlp_best.npz", "cnn": "cnn_best"}[model]
        if src.is_dir():
            cli.atomic_folder(dest, {str(f.relative_to(src)): f.read_bytes()
                                     for f in sorted(src.rglob("*")) if f.is_file()})
        else:
            cli.atomic_write(dest, src.read_bytes())


# ------------------------------------------------------------------------------------------ reproduce
TIMING = ("seconds", "sec_per_epoch", "train_seconds", "backbone_seconds", "finished_at")
REPRODUCE_TOLERANCE = 0.005  # accuracies on another machine (its bf16 kernels, a GPU): within half a point


def _without_timing(x):
    if isinstance(x, dict):
        return {k: _without_timing(v) for k, v in x.items() if k not in TIMING}
    return [_without_timing(v) for v in x] if isinstance(x, list) else x


def compare_studies(new_dir, old_dir) -> tuple[list[dict], str]:
    """Every run record of old_dir against new_dir's of the same key: (a row per run, one line that sums up).
    A row's status: "identical" (every field but the timings), "differs" (with the accuracies' differences)
    or "missing" (not in new_dir)."""
    new, old = (Registry(d, log=lambda *a: None, read_only=True).records for d in (new_dir, old_dir))
    if not old or not new:
        raise StudyError(f"{old_dir if not old else new_dir} holds no run records (runs/*.json) to compare")
    rows = []
    for key, rec in sorted(old.items(), key=lambda kv: (kv[1]["study"], kv[1]["variant"], kv[1]["seed"])):
        other = new.get(key)
        rows.append({"study": rec["study"], "variant": rec["variant"], "seed": rec["seed"], "key": key,
                     "status": "missing" if other is None else
                     "identical" if _without_timing(other) == _without_timing(rec) else "differs",
                     **{f"d_{f}": other[f] - rec[f] for f in ("val_acc", "test_acc")
                        if rec.get(f) is not None and (other or {}).get(f) is not None}})

    counts = {s: sum(r["status"] == s for r in rows) for s in ("identical", "differs", "missing")}
    worst = max((abs(r.get(f"d_{f}", 0.0)) for r in rows for f in ("val_acc", "test_acc")), default=0.0)
    line = (f"{counts['identical']} of {len(rows)} run records identical except timings"
            + (f"; {counts['differs']} differ, the largest accuracy difference {100 * worst:.2f} points "
               f"({'within' if worst <= REPRODUCE_TOLERANCE else 'beyond'} the tolerance of "
               f"{100 * REPRODUCE_TOLERANCE:.1f} points for another machine)" if counts["differs"] else "")
            + (f"; {counts['missing']} missing" if counts["missing"] else ""))
    return rows, line


# ------------------------------------------------------------------------------------------ all outputs
def rebuild_outputs(results_dir, *, log: Callable = print, wall_seconds: float | None = None,
                    workers=None) -> tuple[list[dict], dict, dict]:
    """Every output but the figures from the saved runs and manifest.json, no training: the CSVs,
    summary.json, models/*_best. Refused (StudyError, nothing written) while any run the manifest lists is
    not usable (deleted, damaged, its model gone): statistics over part of the seeds would pass for the
    study's. Returns (rows, manifest, summary): what plots.make_figures draws from."""
    results_dir = Path(results_dir)
    registry = Registry(results_dir, log=log)
    records, manifest = registry.records, load_manifest(results_dir, log)
    listed = {r["key"] for r in manifest["runs"]}
    if missing := sorted(listed - set(records)):
        raise StudyError(f"{len(missing)} of the {len(listed)} runs that manifest.json lists are missing or "
                         f"damaged in {registry.dir} (e.g. {missing[0]}): run the study (python run_experiments.py) "
                         f"to retrain them; the tables, summary and figures are left as they are")
    if skipped := [*registry.set_aside, *sorted(registry.missing_models)]:
        log(f"skipped: {len(skipped)} unusable runs the manifest does not list ({', '.join(skipped[:5])})")
    rows = study_records(records, manifest)
    cands = {m: c for m in MODELS if (c := _candidates(records, manifest, m))}  # the finals, each once
    write_tables(results_dir, rows, records, cands)
    copy_best_models(results_dir, cands)
    summary = write_summary(results_dir, rows, records, manifest, cands, wall_seconds, workers, log)
    return rows, manifest, summary
