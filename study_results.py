"""Storage and summaries of the study: run records, atomic writes, the results lock, tables, statistics.

Everything under a results folder is written here, atomically (a unique temporary file in the same folder,
fsync, os.replace), so a crash, a full disk or a second process never leaves half a file behind:

    runs/<key>.json            one record per finished run (Registry.add; schema: the team contract)
    models/runs/<key>.npz      the model of a final MLP run; models/runs/<key>/ the files of a final CNN run
    mlp_runs.csv, cnn_runs.csv, finals.csv, curves.csv, summary.json, models/mlp_best.npz, models/cnn_best/
                               rebuilt from the records and manifest.json only (rebuild_outputs)

A damaged record (not JSON, not an object, a missing key, a wrong type) is set aside as `<name>.bad`
with one warning naming it, and its run counts as not done, so the study trains it again; so does a
final run whose model file is gone. Whether results are quick or full comes from the records' "plan".
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import socket
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from preprocessing import NUM_CLASSES


class StudyError(Exception):
    """A user-facing error (a folder in use, unreadable results): the driver prints `error: <msg>`, exits 1."""


# ------------------------------------------------------------------------------------------ atomic files

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: mkstemp creates 0600 files, outputs get the usual 0666 & ~umask

TMP_SUFFIX = ".tmp"
STALE_TMP_SECONDS = 60.0  # a temporary file this old belongs to no live writer (writes take < 1 s)


def atomic_write(path, data: str | bytes) -> None:
    """Write `data` to `path` through a unique temporary file in the same folder, fsync, os.replace.
    Readers see the old file or the new one, never half of one. On any failure (a full disk: OSError
    ENOSPC) the temporary file is removed, the original is untouched, and the error is re-raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _to_json_value(x):
    """JSON-ready copy: NaN/inf -> None, numpy scalars and arrays -> Python, tuples -> lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _to_json_value(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_json_value(v) for v in x]
    if isinstance(x, np.ndarray):
        return _to_json_value(x.tolist())
    if isinstance(x, np.generic):
        return _to_json_value(x.item())
    if isinstance(x, Path):
        return str(x)
    return x


def dumps(obj, indent: int | None = 1) -> str:
    """Strict JSON (no NaN, ever: None instead)."""
    return json.dumps(_to_json_value(obj), indent=indent, allow_nan=False)


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def loads(text: str):
    """Strict JSON: NaN / Infinity are refused (ValueError), as every JSON reader but Python's does."""
    return json.loads(text, parse_constant=_reject_constant)


def write_json(path, obj) -> None:
    atomic_write(path, dumps(obj) + "\n")


def _remove_stale_temporaries(folder: Path, log: Callable) -> None:
    """Temporary files left by a killed writer (`*.tmp*`, any depth), older than STALE_TMP_SECONDS."""
    if not folder.is_dir():
        return
    now = time.time()
    for p in folder.rglob(f"*{TMP_SUFFIX}*"):
        try:
            if now - p.lstat().st_mtime < STALE_TMP_SECONDS:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError as e:
            log(f"warning: could not remove the leftover temporary file {p}: {e.strerror}")


# ------------------------------------------------------------------------------------------ the lock

class ResultsLock:
    """Exclusive lock on a results folder (`<results_dir>/.lock`, fcntl.flock), so two studies never
    train the same runs twice. The lock file says who holds it; a second holder gets a StudyError that
    names the pid, host and start time. The lock ends with the process, even on SIGKILL.

        with ResultsLock(results_dir):
            ...train...
    """

    def __init__(self, results_dir, wait: bool = False):
        self.results_dir = Path(results_dir)
        self.path = self.results_dir / ".lock"
        self.wait = wait
        self._fd: int | None = None

    def holder(self) -> str:
        """'pid N on HOST since T' from the lock file, or a vaguer phrase if it cannot be read."""
        try:
            info = loads(self.path.read_text())
            return f"pid {int(info['pid'])} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def acquire(self) -> "ResultsLock":
        import fcntl
        try:
            self.results_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except OSError as e:
            raise StudyError(f"cannot lock {self.results_dir}: {e.strerror} ({self.path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise StudyError(f"{self.results_dir} is in use by {self.holder()}; "
                             f"wait for it or stop it") from None
        except BaseException:
            os.close(fd)
            raise
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        # The file stays (deleting a lock file races with a process that has just opened it): emptied.
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "ResultsLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------ records

ROLES = ("grid", "ablation", "final")
MODELS = ("mlp", "cnn")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num_or_none(v) -> bool:
    return v is None or _is_num(v)


def _fraction_or_none(v) -> bool:
    return v is None or (_is_num(v) and 0 <= v <= 1)


def _nonneg_or_none(v) -> bool:
    return v is None or (_is_num(v) and v >= 0)


# Required keys of every record and their check (the team contract lists the whole record).
REQUIRED: dict[str, Callable] = {
    "key": lambda v: isinstance(v, str) and v != "" and "/" not in v and not v.startswith("."),
    "model": lambda v: v in MODELS,
    "study": lambda v: isinstance(v, str) and v != "",
    "variant": lambda v: isinstance(v, str),
    "seed": lambda v: _is_int(v) and v >= 0,
    "role": lambda v: v in ROLES,
    "config": lambda v: isinstance(v, dict),
    "val_acc": _fraction_or_none,
    "diverged": lambda v: isinstance(v, bool),
}
# Keys that may be missing or null, but when present must have this type and range.
OPTIONAL: dict[str, Callable] = {
    **{k: _fraction_or_none for k in ("train_acc", "test_acc", "test_macro_f1")},
    **{k: _num_or_none for k in ("train_loss", "val_loss", "test_loss")},  # a diverged run's may be huge
    **{k: _nonneg_or_none for k in ("seconds", "sec_per_epoch", "n_params", "macs", "epochs_run", "best_epoch",
                                    "n_train", "n_val", "n_test", "threads")},
    "final": lambda v: v is None or isinstance(v, bool),
    "plan": lambda v: v is None or v in ("full", "quick"),
    "budget": lambda v: v is None or isinstance(v, dict),
    "history": lambda v: v is None or (isinstance(v, list) and all(isinstance(h, dict) for h in v)),
    "test_pred": lambda v: v is None or (isinstance(v, list) and all(_is_int(p) and 0 <= p < NUM_CLASSES
                                                                     for p in v)),
    "model_file": lambda v: v is None or (isinstance(v, str) and not os.path.isabs(v) and ".." not in v),
    "model_files": lambda v: v is None or (isinstance(v, list) and all(isinstance(p, str) for p in v)),
    "error": lambda v: v is None or isinstance(v, str),
}


def record_problem(rec) -> str | None:
    """Why `rec` is not a usable run record (one phrase), or None if it is."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        return "missing " + ", ".join(missing)
    bad = [k for k, ok in REQUIRED.items() if not ok(rec[k])] + \
          [k for k, ok in OPTIONAL.items() if k in rec and not ok(rec[k])]
    if bad:
        return "wrong type or value of " + ", ".join(bad)
    if rec["val_acc"] is None and not rec["diverged"]:
        return "no val_acc for a run that did not diverge"
    if rec["role"] == "final" and not rec["diverged"]:
        need = [k for k in ("model_file", "test_acc", "test_pred") if rec.get(k) is None]
        if need:
            return "a final run without " + ", ".join(need)
        if rec.get("n_test") is not None and len(rec["test_pred"]) != rec["n_test"]:
            return f"{len(rec['test_pred'])} test predictions for {rec['n_test']} test images"
    return None


def _unique_path(path: Path, suffix: str) -> Path:
    cand = path.with_name(path.name + suffix)
    i = 1
    while cand.exists():
        cand = path.with_name(f"{path.name}.{i}{suffix}")
        i += 1
    return cand


def set_aside(path: Path) -> Path | None:
    """Rename a damaged file to `<name>.bad` (`<name>.1.bad`, ... if taken); None if it cannot be."""
    dest = _unique_path(path, ".bad")
    try:
        os.replace(path, dest)
    except OSError:
        return None
    return dest


class Registry:
    """The finished runs of a results folder (`runs/<key>.json`), keyed by run key.

    `key in registry` is True only for a valid record, and for a final run only while its model file
    exists: a damaged record is set aside (renamed `.bad`, one warning) and a final run without its model
    is redone. `records` holds the usable records; `set_aside` and `missing_models` say what was skipped.
    """

    def __init__(self, results_dir, log: Callable = print):
        self.results_dir = Path(results_dir)
        self.dir = self.results_dir / "runs"
        self.log = log
        self.records: dict[str, dict] = {}
        self.set_aside: list[str] = []        # file names renamed to .bad, ever, by this registry
        self.missing_models: dict[str, str] = {}  # key -> model file not found (the run is redone)
        self.reload()

    def model_present(self, rec: dict) -> bool:
        """Every model file of a final run exists (model_files when recorded, else model_file)."""
        if rec.get("role") != "final" or rec.get("diverged"):
            return True
        paths = rec.get("model_files") or [rec["model_file"]]
        for rel in paths:
            p = self.results_dir / rel
            if not p.exists() or (p.is_dir() and not any(p.iterdir())):
                return False
        return True

    def reload(self) -> None:
        self.records = {}
        _remove_stale_temporaries(self.dir, self.log)
        _remove_stale_temporaries(self.results_dir / "models", self.log)
        if not self.dir.is_dir():
            return
        for p in sorted(self.dir.glob("*.json")):
            try:
                rec = loads(p.read_text(encoding="utf-8"))
                problem = record_problem(rec)
            except UnicodeDecodeError:
                problem = "not text"
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                problem = f"not valid JSON ({e})"
            except OSError as e:
                self.log(f"warning: cannot read run record {p}: {e.strerror}; its run counts as not done")
                continue
            if problem is None and rec["key"] != p.stem:  # a copy under another name: not the run it names
                problem = f"it holds run {rec['key']}, not {p.stem}"
            if problem is not None:
                dest = set_aside(p)
                where = f"set aside as {dest.name}" if dest else "could not be renamed"
                self.log(f"warning: damaged run record {p} ({problem}): {where}; the run will be redone")
                self.set_aside.append(p.name)
                continue
            key = rec["key"]
            if not self.model_present(rec):
                if key not in self.missing_models:
                    self.log(f"warning: the model of final run {key} ({rec.get('model_file')}) is missing; "
                             f"the run will be redone")
                self.missing_models[key] = rec.get("model_file") or ""
                continue
            self.missing_models.pop(key, None)
            rec["final"] = rec["role"] == "final"
            self.records[key] = rec

    def __contains__(self, key) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key, default=None):
        return self.records.get(key, default)

    def add(self, record: dict, model_files: dict[str, bytes] | None = None) -> dict:
        """Save one finished run: each model file first (paths relative to the results folder, e.g.
        "models/runs/<key>.npz"), then the record, all atomically, so a crash never leaves a record
        without its model. NaN becomes null. Returns the record as saved. A record that breaks the
        schema is a bug of the caller: ValueError, nothing written."""
        rec = _to_json_value(dict(record))
        if isinstance(rec.get("role"), str):
            rec["final"] = rec["role"] == "final"
        if model_files:
            rec["model_files"] = sorted(model_files)
        problem = record_problem(rec)
        if problem is not None:
            raise ValueError(f"run record {rec.get('key') if isinstance(rec, dict) else rec!r}: {problem}")
        for rel, data in (model_files or {}).items():
            if os.path.isabs(rel) or ".." in Path(rel).parts:
                raise ValueError(f"model file {rel!r} must be relative to the results folder")
            atomic_write(self.results_dir / rel, data)
        write_json(self.dir / f"{rec['key']}.json", rec)
        self.records[rec["key"]] = rec
        self.missing_models.pop(rec["key"], None)
        return rec


# ------------------------------------------------------------------------------------------ statistics

def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95% for z = 1.96); (0, 1) when n = 0. Unlike the
    normal approximation it stays inside [0, 1] and is sensible near 0 and 1."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
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
    n01 = int(np.sum(~right_a & right_b))
    n10 = int(np.sum(right_a & ~right_b))
    n = n01 + n10
    if n == 0:
        p = 1.0
    elif n < 25:
        tail = sum(math.comb(n, i) for i in range(min(n01, n10) + 1))  # exact, integers
        p = min(1.0, 2 * tail / 2 ** n)
    else:
        x = max(abs(n01 - n10) - 1, 0) ** 2 / n
        p = math.erfc(math.sqrt(x / 2))
    return {"n01": n01, "n10": n10, "p_value": float(p)}


NOISE_Z = 2.0  # a gap is "more than the noise" when it exceeds 2 standard errors of the difference


def pooled_sd(groups) -> float | None:
    """Seed-to-seed std of validation accuracy pooled over (n, std) groups; groups of one seed (std None)
    add nothing. None when no group has two seeds."""
    groups = [(n, sd) for n, sd in groups if n > 1 and sd is not None]
    dof = sum(n - 1 for n, _ in groups)
    return math.sqrt(sum((n - 1) * sd ** 2 for n, sd in groups) / dof) if dof else None


def noise_margin(sd: float | None, n_a: int, n_b: int) -> float | None:
    """NOISE_Z standard errors of the difference between two means of n_a and n_b seeds."""
    return None if sd is None else NOISE_Z * sd * math.sqrt(1 / n_a + 1 / n_b)


def _mean(vals) -> float | None:
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
    for variant, recs in groups.items():
        if not recs:
            continue
        ok = [r for r in recs if not r["diverged"]]
        row = {"variant": variant, "n": len(recs)}
        for m in ("val_acc", "train_acc"):
            vals = [r[m] for r in ok if r.get(m) is not None]
            row[m], row[m + "_std"] = _mean(vals), sample_std(vals)
        for m in ("n_params", "macs", "seconds", "sec_per_epoch"):
            row[m] = _mean([r[m] for r in recs if r.get(m) is not None])
        for m in ("n_params", "macs"):
            row[m] = None if row[m] is None else int(round(row[m]))
        row["diverged"] = sum(bool(r["diverged"]) for r in recs)
        out.append(row)
    return out


def classification_report(y_true, y_pred, class_names=None) -> dict:
    """Confusion matrix (rows = true class), per-class precision / recall / f1 and macro-F1."""
    if class_names is None:
        from preprocessing import CLASS_NAMES as class_names
    k = len(class_names)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                   where=(precision + recall) > 0)
    return {"test_macro_f1": float(f1.mean()),
            "per_class": [{"class": class_names[c], "precision": float(precision[c]),
                           "recall": float(recall[c]), "f1": float(f1[c])} for c in range(k)],
            "confusion": cm.tolist()}


# ------------------------------------------------------------------------------------------ manifest

def read_json(path, log: Callable = print, what: str | None = None):
    """Strict JSON of a file, or None with one warning if it is there but unreadable (never a traceback)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        log(f"warning: {path} is not readable JSON ({str(e).splitlines()[0]}): "
            f"{what or 'ignored'}")
        return None


_MANIFEST_ROW = {"key": lambda v: isinstance(v, str) and v != "", "model": lambda v: v in MODELS,
                 "study": lambda v: isinstance(v, str), "variant": lambda v: isinstance(v, str),
                 "seed": _is_int, "role": lambda v: v is None or v in ROLES}


def load_manifest(results_dir, log: Callable = print) -> dict:
    """manifest.json with every part checked: a damaged file, or a damaged part of it (a run row, a
    stage, a final), is left out with one warning. Always has "runs", "stages", "finals"."""
    path = Path(results_dir) / "manifest.json"
    raw = read_json(path, log, "ignored: tables and summary from the run records alone")
    if raw is None:
        raw = {}
    problems = []
    if not isinstance(raw, dict):
        problems.append(f"a JSON {type(raw).__name__}, not an object")
        raw = {}
    out = {k: v for k, v in raw.items() if k not in ("runs", "stages", "finals")}
    runs = raw.get("runs", [])
    if not isinstance(runs, list):
        problems.append("runs is not a list")
        runs = []
    good = [r for r in runs if isinstance(r, dict)
            and all(ok(r.get(k)) for k, ok in _MANIFEST_ROW.items() if k != "role" or k in r)]
    if len(good) < len(runs):
        problems.append(f"{len(runs) - len(good)} damaged run rows")
    out["runs"] = good
    stages = raw.get("stages", {})
    if not isinstance(stages, dict):
        problems.append("stages is not an object")
        stages = {}
    out["stages"] = {s: st for s, st in stages.items() if isinstance(st, dict)
                     and (not isinstance(st.get("levels"), list) or all(isinstance(v, str) for v in st["levels"]))}
    if len(out["stages"]) < len(stages):
        problems.append("damaged stages: " + ", ".join(sorted(set(stages) - set(out["stages"]))))
    finals = raw.get("finals", {})
    if not isinstance(finals, dict):
        problems.append("finals is not an object")
        finals = {}
    out["finals"] = {m: f for m, f in finals.items() if m in MODELS and isinstance(f, dict)
                     and isinstance(f.get("chain"), str)
                     and (f.get("default") is None or isinstance(f["default"], str))
                     and f.get("kept", "chain") in ("chain", "default")
                     and isinstance(f.get("seeds", []), list)
                     and all(isinstance(k, str) for k in f.get("seeds", []))}
    if len(out["finals"]) < len(finals):
        problems.append("damaged finals: " + ", ".join(sorted(map(str, set(finals) - set(out["finals"])))))
    if problems:
        log(f"warning: {path}: " + "; ".join(problems) + ": those parts ignored")
    return out


def study_records(records: dict[str, dict], manifest: dict) -> list[dict]:
    """The runs as members of their comparisons: one row per manifest row whose run is done (a run shared
    by two stages, the incumbent level, appears in both, relabelled); runs the manifest does not list
    (or every run, without a manifest) under their own labels."""
    out, listed = [], set()
    for row in manifest.get("runs", []):
        rec = records.get(row["key"])
        if rec is None:
            continue
        listed.add(row["key"])
        out.append({**rec, "study": row["study"], "variant": row["variant"],
                    "role": row.get("role") or rec["role"]})
    out += [rec for key, rec in records.items() if key not in listed]
    return out


# ------------------------------------------------------------------------------------------ finals

def _candidates(records: dict[str, dict], manifest: dict, model: str) -> dict | None:
    """{"kept": name, "runs": {name: seed-0 record}, "seeds": [records of the kept candidate], "default_key"}
    from manifest "finals"; without it, from the final records (grouped by config, best val kept)."""
    spec = manifest.get("finals", {}).get(model)
    if spec:
        runs = {name: records[spec[name]] for name in ("chain", "default")
                if spec.get(name) in records and not records[spec[name]]["diverged"]}
        kept = spec.get("kept", "chain")
        if kept not in runs:
            return None
        seed_keys = [k for k in dict.fromkeys([runs[kept]["key"], *spec.get("seeds", [])])
                     if k in records and not records[k]["diverged"]]
        seeds = sorted((records[k] for k in seed_keys), key=lambda r: r["seed"])
        same = spec.get("default") is None or spec.get("default") == spec["chain"] or kept == "default"
        return {"kept": kept, "runs": runs, "seeds": seeds,
                "matches_module_default": spec.get("matches_module_default", same)}
    finals = [r for r in records.values() if r["model"] == model and r["role"] == "final"
              and not r["diverged"]]
    if not finals:
        return None
    groups: dict[str, list[dict]] = {}
    for r in finals:
        groups.setdefault(json.dumps(r["config"], sort_keys=True), []).append(r)
    firsts = {cfg: min(rs, key=lambda r: r["seed"]) for cfg, rs in groups.items()}
    best_cfg = max(firsts, key=lambda c: firsts[c]["val_acc"])
    names = {c: firsts[c]["variant"] or f"candidate {i}" for i, c in enumerate(firsts)}
    runs = {names[c]: firsts[c] for c in firsts}
    kept = names[best_cfg]
    return {"kept": kept, "runs": runs, "seeds": sorted(groups[best_cfg], key=lambda r: r["seed"]),
            "matches_module_default": None}


def _test_labels(rec: dict, splits) -> np.ndarray | None:
    """The labels of the test images a final run predicted: its own "test_true" if recorded, else the
    test split when the sizes agree."""
    if isinstance(rec.get("test_true"), list):
        return np.asarray(rec["test_true"])
    if splits is not None and rec.get("test_pred") is not None \
            and len(getattr(splits, "y_test", ())) == len(rec["test_pred"]):
        return np.asarray(splits.y_test)
    return None


def _mcnemar_row(a: str, b: str, ra: dict, rb: dict, splits) -> dict | None:
    ya, yb = _test_labels(ra, splits), _test_labels(rb, splits)
    if ya is None or yb is None or len(ya) != len(yb) or not np.array_equal(ya, yb) \
            or len(ra["test_pred"]) != len(rb["test_pred"]):
        return None
    return {"a": a, "b": b, "a_key": ra["key"], "b_key": rb["key"],
            **mcnemar(ra["test_pred"], rb["test_pred"], ya), "acc_a": ra["test_acc"], "acc_b": rb["test_acc"]}


def _wilson_of(rec: dict) -> list[float] | None:
    n = rec.get("n_test") or len(rec.get("test_pred") or [])
    if not n or rec.get("test_acc") is None:
        return None
    return list(wilson_interval(int(round(rec["test_acc"] * n)), int(n)))


def _model_summary(c: dict) -> dict:
    rec = c["runs"][c["kept"]]
    seed_accs = [r["test_acc"] for r in c["seeds"] if r.get("test_acc") is not None]
    return {
        "test_acc": rec["test_acc"], "val_acc": rec["val_acc"], "test_macro_f1": rec.get("test_macro_f1"),
        "per_class": rec.get("per_class"), "confusion": rec.get("confusion"), "config": rec["config"],
        "key": rec["key"], "kept": c["kept"], "matches_module_default": c["matches_module_default"],
        "train_seconds": rec.get("seconds"), "epochs_run": rec.get("epochs_run"),
        "n_params": rec.get("n_params"), "macs": rec.get("macs"), "n_test": rec.get("n_test"),
        "test_acc_wilson95": _wilson_of(rec),
        "seeds": [{"seed": r["seed"], "key": r["key"], "val_acc": r["val_acc"], "test_acc": r.get("test_acc"),
                   "test_acc_wilson95": _wilson_of(r)} for r in c["seeds"]],
        "test_acc_mean": _mean(seed_accs), "test_acc_std": sample_std(seed_accs),
        "candidates": [{"name": name, "key": r["key"], "val_acc": r["val_acc"], "test_acc": r.get("test_acc"),
                        "test_acc_wilson95": _wilson_of(r), "config": r["config"]}
                       for name, r in c["runs"].items()],
    }


def _versions() -> dict:
    from importlib import metadata
    v = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform()}
    for name in ("torch", "pandas", "matplotlib"):
        try:
            v[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return v


def _grid_seeds(manifest: dict, recs: list[dict]) -> dict[str, list[int]]:
    """The grid's seeds per track: the manifest's, else those of the saved grid runs."""
    seeds = manifest.get("seeds")
    if isinstance(seeds, dict) and all(isinstance(v, list) for v in seeds.values()):
        return seeds
    return {m: sorted({r["seed"] for r in recs if r["role"] == "grid" and r["model"] == m})
            for m in ("mlp", "cnn") if any(r["role"] == "grid" and r["model"] == m for r in recs)}


def _plan_of(records: list[dict], manifest: dict, log: Callable) -> str | None:
    """"quick" or "full", from the records themselves (the final runs' if they disagree), else the manifest."""
    plans = [r.get("plan") for r in records if r.get("plan")]
    if not plans:
        return manifest.get("plan") if manifest.get("plan") in ("quick", "full") else None
    if len(set(plans)) == 1:
        return plans[0]
    finals = [r.get("plan") for r in records if r["role"] == "final" and r.get("plan")]
    pick = max(sorted(set(finals or plans)), key=(finals or plans).count)
    log(f"warning: the runs mix plans ({plans.count('full')} full, {plans.count('quick')} quick): "
        f"the results are labelled {pick}")
    return pick


def _budgets(records: list[dict]) -> dict:
    """The training budget of each kind of run, e.g. {"mlp_grid": {"subset": 20000, "epochs": 10}}; a
    list where runs of one kind differ."""
    out: dict[str, list] = {}
    for r in records:
        b = r.get("budget")
        if isinstance(b, dict):
            seen = out.setdefault(f"{r['model']}_{r['role']}", [])
            if b not in seen:
                seen.append(b)
    return {k: v[0] if len(v) == 1 else v for k, v in out.items()}


def write_summary(results_dir, rows: list[dict], records: dict[str, dict], manifest: dict, splits=None, *,
                  wall_seconds=None, workers=None, log: Callable = print) -> dict:
    """summary.json (schema: the team contract) from the records and the manifest; returns it."""
    results_dir = Path(results_dir)
    summary: dict = {}
    cands = {m: _candidates(records, manifest, m) for m in MODELS}
    for m, c in cands.items():
        if c is not None:
            summary[m] = _model_summary(c)
    tests = []
    if cands["mlp"] and cands["cnn"]:
        tests.append(("MLP", "CNN", cands["mlp"]["runs"][cands["mlp"]["kept"]],
                      cands["cnn"]["runs"][cands["cnn"]["kept"]]))
    for m, c in cands.items():
        if c and {"chain", "default"} <= set(c["runs"]) and c["runs"]["chain"]["key"] != c["runs"]["default"]["key"]:
            tests.append((f"{m.upper()} chain", f"{m.upper()} default", c["runs"]["chain"], c["runs"]["default"]))
    summary["mcnemar"] = []
    if tests and splits is None and not all(isinstance(r.get("test_true"), list) for t in tests for r in t[2:]):
        try:  # the test labels, to pair the predictions; the figures that need images get them too
            import preprocessing
            splits = preprocessing.load_splits(download=False)
        except Exception as e:  # noqa: BLE001 - no data here: the McNemar tests are skipped below
            log(f"warning: no data ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    for a, b, ra, rb in tests:
        row = _mcnemar_row(a, b, ra, rb, splits)
        if row is None:
            log(f"warning: no McNemar test {a} vs {b}: the test labels of their predictions are not known "
                f"(pass the data splits)")
        else:
            summary["mcnemar"].append(row)
    summary["stages"] = {}
    for study, st in manifest.get("stages", {}).items():
        levels = st.get("levels") if isinstance(st.get("levels"), list) else None
        summary["stages"][study] = {**st, "table": study_table(rows, study, levels)}
    if not manifest.get("stages"):  # no (readable) manifest: every grid study, levels in run order
        for r in rows:
            if r["role"] == "grid" and r["study"] not in summary["stages"]:
                summary["stages"][r["study"]] = {"model": r["model"], "table": study_table(rows, r["study"])}
    abl = manifest.get("stages", {}).get("cnn_ablation", {})
    summary["ablation"] = study_table(rows, "cnn_ablation", abl.get("levels") if isinstance(abl.get("levels"), list) else None)
    recs = list(records.values())
    previous = read_json(results_dir / "summary.json", log, "its wall_seconds and workers are not kept")
    prev_study = previous.get("study", {}) if isinstance(previous, dict) else {}
    prev_study = prev_study if isinstance(prev_study, dict) else {}
    finished = [r["finished_at"] for r in recs if isinstance(r.get("finished_at"), str)]
    summary["study"] = {
        "plan": _plan_of(recs, manifest, log),
        "seeds": _grid_seeds(manifest, recs),
        "grid_budget": _budgets(recs),
        "n_runs": len(recs), "n_diverged": sum(bool(r["diverged"]) for r in recs),
        "seconds": float(sum(r.get("seconds") or 0.0 for r in recs)),
        "wall_seconds": wall_seconds if wall_seconds is not None else prev_study.get("wall_seconds"),
        "workers": workers if workers is not None else prev_study.get("workers"),
        "finished_at": max(finished) if finished else None,
        "versions": _versions(),
    }
    write_json(results_dir / "summary.json", summary)
    return summary


# ------------------------------------------------------------------------------------------ tables

def _cell(v):
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v)) if v else "none"
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return v


RUN_COLUMNS_HEAD = ["study", "variant", "seed", "role", "plan"]
RUN_COLUMNS_TAIL = ["budget_subset", "budget_epochs", "n_train", "n_val", "epochs_run", "best_epoch", "train_loss",
                    "train_acc", "val_loss", "val_acc", "seconds", "sec_per_epoch", "threads", "device",
                    "n_params", "macs", "diverged", "key", "error"]  # never a test column (contract)
FINALS_COLUMNS = ["model", "study", "variant", "seed", "candidate", "kept", "key", "plan", "val_acc",
                  "train_acc", "test_loss", "test_acc", "test_macro_f1", "test_acc_wilson_lo",
                  "test_acc_wilson_hi", "n_test", "seconds", "epochs_run", "n_params", "macs", "diverged"]
CURVE_COLUMNS = ["key", "study", "variant", "seed", "role", "epoch", "phase", "lr", "train_loss", "train_acc",
                 "val_loss", "val_acc", "seconds"]


def _csv_text(columns: list[str], rows: list[dict]) -> str:
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def write_tables(results_dir, rows: list[dict], records: dict[str, dict] | None = None,
                 manifest: dict | None = None) -> list[Path]:
    """mlp_runs.csv, cnn_runs.csv (every run, no test columns), finals.csv (final runs with their test
    accuracy and its Wilson interval), curves.csv (per-epoch history). Returns the paths written."""
    results_dir = Path(results_dir)
    written = []
    for model in MODELS:
        recs = [r for r in rows if r["model"] == model]
        cfg_cols: list[str] = []
        for r in recs:
            cfg_cols += [k for k in r["config"] if k not in cfg_cols and k not in ("seed", "device")
                         and k not in RUN_COLUMNS_HEAD + RUN_COLUMNS_TAIL]
        table = [{**{k: r["config"].get(k) for k in cfg_cols},
                  **{k: r.get(k) for k in RUN_COLUMNS_HEAD + RUN_COLUMNS_TAIL},
                  **{f"budget_{k}": v for k, v in (r.get("budget") or {}).items()}}
                 for r in recs]
        path = results_dir / f"{model}_runs.csv"
        atomic_write(path, _csv_text(RUN_COLUMNS_HEAD + cfg_cols + RUN_COLUMNS_TAIL, table))
        written.append(path)
    records = records if records is not None else {r["key"]: r for r in rows}
    names, kept = {}, set()
    for m in MODELS:
        c = _candidates(records, manifest or {}, m)
        if c:
            names.update({r["key"]: n for n, r in c["runs"].items()})
            kept.update(r["key"] for r in c["seeds"])
            spec = (manifest or {}).get("finals", {}).get(m, {})
            for k in spec.get("seeds", []):  # seed runs belong to the kept candidate
                names.setdefault(k, c["kept"])
    finals = []
    for r in sorted((r for r in records.values() if r["role"] == "final"),
                    key=lambda r: (MODELS.index(r["model"]), r["variant"], r["seed"])):
        lo_hi = _wilson_of(r) or [None, None]
        finals.append({**r, "candidate": names.get(r["key"]), "kept": r["key"] in kept,
                       "test_acc_wilson_lo": lo_hi[0], "test_acc_wilson_hi": lo_hi[1]})
    path = results_dir / "finals.csv"
    atomic_write(path, _csv_text(FINALS_COLUMNS, finals))
    written.append(path)
    curves = [{**h, "key": r["key"], "study": r["study"], "variant": r["variant"], "seed": r["seed"],
               "role": r["role"]} for r in rows for h in r.get("history") or []]
    path = results_dir / "curves.csv"
    atomic_write(path, _csv_text(CURVE_COLUMNS, curves))
    written.append(path)
    return written


# ------------------------------------------------------------------------------------------ best models

def _copy_dir_atomic(src: Path, dest: Path) -> None:
    """Copy directory `src` over `dest`: into a unique temporary folder beside dest, then renamed in; the
    old dest is moved away first and removed after, or restored if the rename fails."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=TMP_SUFFIX, dir=dest.parent))
    old = None
    try:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                atomic_write(tmp / f.relative_to(src), f.read_bytes())
        os.chmod(tmp, 0o777 & ~_UMASK)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", suffix=TMP_SUFFIX, dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / dest.name).exists() and not dest.exists():
            os.replace(old / dest.name, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_best_models(results_dir, records: dict[str, dict], manifest: dict, log: Callable = print) -> list[Path]:
    """models/mlp_best.npz and models/cnn_best/: copies of the kept final models (seed 0), atomically."""
    results_dir = Path(results_dir)
    written = []
    for model, dest in (("mlp", results_dir / "models" / "mlp_best.npz"),
                        ("cnn", results_dir / "models" / "cnn_best")):
        c = _candidates(records, manifest, model)
        if c is None:
            continue
        rec = c["runs"][c["kept"]]
        src = results_dir / rec["model_file"]
        if not src.exists():
            log(f"warning: the {model.upper()} model {src} is missing: {dest.name} not updated")
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            _copy_dir_atomic(src, dest)
        else:
            atomic_write(dest, src.read_bytes())
        written.append(dest)
    return written


# ------------------------------------------------------------------------------------------ all outputs

def rebuild_outputs(results_dir, splits=None, *, plots: bool = True, log: Callable = print,
                    wall_seconds: float | None = None, workers: int | None = None) -> dict:
    """Every output from the saved runs and manifest.json, no training: the CSVs, summary.json,
    models/*_best and (if `plots` and plots.py is there) the figures. Damaged records, manifest or
    summary are skipped with a warning; one line names what was skipped. Returns the summary."""
    results_dir = Path(results_dir)
    registry = Registry(results_dir, log=log)
    manifest = load_manifest(results_dir, log)
    if manifest.get("runs") and not registry.records:  # e.g. runs/ lost: rebuilding would empty every output
        raise StudyError(f"{registry.dir} holds none of the {len(manifest['runs'])} runs that manifest.json "
                         f"lists: nothing to rebuild from, so the tables, summary and figures are left as they are")
    rows = study_records(registry.records, manifest)
    write_tables(results_dir, rows, registry.records, manifest)
    copy_best_models(results_dir, registry.records, manifest, log)
    summary = write_summary(results_dir, rows, registry.records, manifest, splits,
                            wall_seconds=wall_seconds, workers=workers, log=log)
    def some(names: list[str], n: int = 5) -> str:
        return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
    skipped = []
    if registry.set_aside:
        skipped.append(f"{len(registry.set_aside)} damaged run records ({some(registry.set_aside)})")
    if registry.missing_models:
        skipped.append(f"{len(registry.missing_models)} final runs without their model "
                       f"({some(sorted(registry.missing_models))})")
    missing = ({r["key"] for r in manifest["runs"]} - set(registry.records) - set(registry.missing_models)
               - {name.split(".")[0] for name in registry.set_aside})
    if missing:
        skipped.append(f"{len(missing)} runs of the manifest not done")
    if skipped:
        log("skipped: " + "; ".join(skipped))
    if plots:
        try:
            import plots as plots_module  # lazily: matplotlib is slow to import
        except ModuleNotFoundError as e:
            if e.name != "plots":
                raise
            log("plots.py not found: no figures")
        else:
            plots_module.make_figures(results_dir, rows, manifest, summary, splits)
    return summary
