"""The hyperparameter study: assignment Q2f (MLP), Q3a-d (CNN) and the evidence for Q4.

    python run_experiments.py                  # the full study (<= 45 min on the 2-core CPU), then the report
    python run_experiments.py --quick --results-dir results-quick   # every output, small data, < 3 min
    python run_experiments.py --plots-only     # rebuild CSVs, summary.json and figures from results/runs/

Design. A *run* is (study, variant, config, seed). Its key is a short hash of the full config (JSON),
the seed and the study budget (training subset, eval subset, epochs), so a second start skips every run
whose key is already in `runs/`, and an interrupt loses at most the run in flight. Each finished run is
one JSON file written atomically (temporary file + os.replace); every CSV, summary.json and figure is
rebuilt from those files only, so they can be remade without training (`--plots-only`).

The grid is sequential, "settle one factor, then the next": each stage varies one factor around the
current configuration (the incumbent), every level over all seeds (default 3), and the level with the
best mean *validation* accuracy becomes the incumbent of the next stage (ties and variants with a
diverged seed never win over the incumbent). Test accuracy is recorded for every run but never used to
choose. The incumbent's level reappears in the next stage with the same key, so it is not trained twice.

    MLP: mlp_activation -> mlp_depth -> mlp_width -> mlp_dropout -> mlp_optimizer -> mlp_lr -> mlp_final
    CNN: cnn_pool -> cnn_kernel -> cnn_filters -> cnn_init -> cnn_head_mode -> cnn_head -> cnn_final

The grid uses a reduced budget (FULL_PLAN: MLP 20k training images x 10 epochs from a 256-256 start;
CNN 20k images x 4 epochs, 3k val/test images, narrow 8..32 filters, no BatchNorm or augmentation);
`summary.json` study.grid_budget says so, and the `subset` / `epochs` columns of the CSVs show it per
run. Each track starts from a fixed point (MLP_GRID_START, CNN_GRID_START) that pins every factor the
grid settles, so the grid does not depend on the modules' defaults there. The final stage trains the
chosen factors on all 54k training images, seed 0, with the module default's training recipe (epochs,
schedule, batch size; for the CNN also BatchNorm, augmentation and precision); the CNN's chosen filter
shape is scaled to the widest first layer whose multiply-adds do not exceed CNN_FINAL_REFERENCE's,
so the final gets the same compute whichever shape or kernel won. For both tracks the module's default
configuration is trained beside the study's choice when they differ, and the better on validation is
the final model (summary.json says which, and whether it matches the module's default). The plan and its expected time are
printed at start.

Outputs under --results-dir (default results/):
    runs/<key>.json         one per finished run: config, budget, metrics, history, layer statistics
    manifest.json           which runs make up each comparison (a run shared by two stages, the
                            incumbent level, belongs to both) and each stage's winner
    mlp_runs.csv, cnn_runs.csv   one row per run (columns: see CSV_COLUMNS / the team contract)
    curves.csv              per-epoch history of every run
    init_stats.csv          per-layer activation mean/std, dead fraction, gradient norm at initialisation
    summary.json            the chosen configurations, their val/test accuracy, macro-F1, per-class
                            precision/recall/f1, confusion matrices, and the study's budget and versions
    models/mlp_best.npz     the final MLP (mlp_scratch.MLP.load)
    models/cnn_best/        the final CNN (cnn_torch.load_classifier)
    models/runs/            the model of every final-stage run, by key
    figures/learning_curves.png           train vs val loss and accuracy of both final models
    figures/compare_<study>.png           mean +- std (over seeds) val and train accuracy per level, one
                                          per grid stage (e.g. compare_mlp_activation.png, compare_cnn_pool.png)
    figures/compare_mlp.png, figures/compare_cnn.png   all stages of a track in one figure
    figures/init_stats_mlp_init.png       per-layer activation std, gradient norm, dead fraction per init
    figures/init_stats_mlp_activation.png the same per activation
    figures/init_stats_cnn_init.png       the same for the CNN's five conv layers per init
    figures/confusion_mlp.png, figures/confusion_cnn.png
    figures/per_class_accuracy.png        per-class test accuracy (recall) of both final models
    figures/misclassified_mlp.png, figures/misclassified_cnn.png   galleries of misclassified test images
    figures/class_samples.png             eight training images of each class
    figures/cnn_filters.png               the final CNN's first-layer filters
At the end the report is built with report.build.build_report(results_dir) unless --no-report.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

import preprocessing
from preprocessing import CLASS_NAMES, NUM_CLASSES, Splits, to_images

REPO_DIR = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------- budgets

@dataclass(frozen=True)
class Budget:
    """How much data and training a run gets; part of the run key."""
    subset: int | None      # training images (None = all 54k)
    n_eval: int | None      # val and test images each (None = all 6k / 10k)
    epochs: int | None      # None = the module default's epochs (final runs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Plan:
    """Budgets of one study; --quick swaps in a tiny one."""
    mlp_grid: Budget
    cnn_grid: Budget
    mlp_final: Budget
    cnn_final: Budget
    # Overrides applied to every grid run of a track (never to the finals): they keep the grid inside
    # the time budget, e.g. a narrower CNN and no early stopping, so every run trains its full epochs.
    mlp_grid_overrides: dict = field(default_factory=dict)
    cnn_grid_overrides: dict = field(default_factory=dict)
    mlp_final_overrides: dict = field(default_factory=dict)
    cnn_final_overrides: dict = field(default_factory=dict)
    # Widest first layer of the final CNN (None = CNN_FINAL_REFERENCE's). The chosen filter shape is
    # scaled to the widest first layer up to this whose multiply-adds do not exceed the reference's, so
    # the final gets the same compute whichever shape, kernel and pooling won the grid.
    cnn_final_first_filters: int | None = None
    quick: bool = False
    max_levels: int | None = None   # quick: the first levels of each stage only (plus the incumbent)


# The CNN grid trains the plain architecture of the assignment (conv + ReLU, no BatchNorm), so that the
# init and pooling comparisons show their raw effect; BatchNorm and augmentation belong to the final
# model's training recipe (CNNConfig's defaults). Narrow filters keep the grid inside the CPU budget.
# The grid's starting point pins every factor the grid settles (MLP_STUDY_FIELDS, CNN_STUDY_FIELDS), so
# the grid does not depend on the modules' defaults there: those defaults are set to the study's choice
# afterwards, and the same code then reproduces the same runs.
MLP_GRID_START = {"hidden": [256, 256], "activation": "relu", "dropout": 0.2, "optimizer": "adamw",
                  "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-2}
CNN_GRID_START = {"pool": "max", "kernel_size": 3, "filters": "8,8,16,16,32", "base_filters": 8,
                  "init": "he", "head_mode": "joint", "head_hidden": [256], "head_activation": "relu",
                  "head_dropout": 0.3}
# Config fields added after runs were recorded, with the value that reproduces the code before them. A
# field at that value is left out of the run key, so adding an option does not orphan finished runs that
# never used it (the grid pins them at these values in CNN_GRID_RECIPE).
KEY_NEUTRAL = {"cnn": {"erase": 0.0, "label_smoothing": 0.0, "tta": False}}
# The grid's training recipe, pinned for the same reason as its starting point: the plain network (no
# BatchNorm, augmentation, erasing, label smoothing or test-time mirroring) with the optimizer settings
# it was run with.
CNN_GRID_RECIPE = {"batchnorm": False, "augment": False, **KEY_NEUTRAL["cnn"],
                   "optimizer": "adamw", "lr": 3e-3, "head_lr": 1e-3, "weight_decay": 5e-4,
                   "schedule": "onecycle", "batch_size": 128, "head_epochs": 20}

# The architecture whose compute the final CNN may spend: the one whose 26-epoch recipe trains in about
# 14 minutes here (cnn_torch's tuned configuration). Fixed here, not read from the module's defaults.
CNN_FINAL_REFERENCE = {"filters": "32,32,64,64,128", "kernel_size": 3, "pool": "max", "head_hidden": [256]}

FULL_PLAN = Plan(
    mlp_grid=Budget(subset=20000, n_eval=None, epochs=10),
    cnn_grid=Budget(subset=20000, n_eval=3000, epochs=4),
    mlp_final=Budget(subset=None, n_eval=None, epochs=None),
    cnn_final=Budget(subset=None, n_eval=None, epochs=None),
    mlp_grid_overrides={**MLP_GRID_START, "patience": 0},
    cnn_grid_overrides={**CNN_GRID_START, **CNN_GRID_RECIPE, "patience": 0},
)

QUICK_PLAN = Plan(
    mlp_grid=Budget(subset=1500, n_eval=500, epochs=1),
    cnn_grid=Budget(subset=400, n_eval=300, epochs=1),
    mlp_final=Budget(subset=3000, n_eval=1000, epochs=2),
    cnn_final=Budget(subset=1000, n_eval=1000, epochs=1),
    mlp_grid_overrides={**MLP_GRID_START, "patience": 0, "hidden": [64, 64]},
    cnn_grid_overrides={**CNN_GRID_START, **CNN_GRID_RECIPE, "patience": 0, "filters": "4,4,8,8,16",
                        "base_filters": 4, "head_epochs": 2},
    mlp_final_overrides={"patience": 0, "hidden": [128, 128]},
    cnn_final_overrides={"patience": 0, "augment": False, "head_epochs": 2},
    cnn_final_first_filters=8,
    quick=True,
    max_levels=2,
)
QUICK_SEEDS = (0, 1)


# ----------------------------------------------------------------------------------------- stages

@dataclass(frozen=True)
class Level:
    variant: str        # human label of the level, e.g. "gelu"
    changes: dict       # config fields this level sets


@dataclass(frozen=True)
class Stage:
    study: str                                   # e.g. "mlp_activation"
    model: str                                   # "mlp" | "cnn"
    factor: str                                  # axis label for plots
    levels: Callable[[dict], list[Level]]        # incumbent config -> levels (incumbent's own included)


def _fixed(field_name: str, values, label=str) -> Callable[[dict], list[Level]]:
    return lambda cfg: [Level(label(v), {field_name: v}) for v in values]


def _mlp_depth(depths):
    def levels(cfg):
        width = cfg["hidden"][0] if cfg["hidden"] else 256
        return [Level(str(d), {"hidden": [width] * d}) for d in depths]
    return levels


def _mlp_width(widths):
    def levels(cfg):
        depth = max(len(cfg["hidden"]), 1)
        return [Level(str(w), {"hidden": [w] * depth}) for w in widths]
    return levels


# Each optimizer at a learning rate that suits it; the next stage then scans the rate of the winner.
MLP_OPTIMIZERS = {"sgd": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
                  "nesterov": {"optimizer": "nesterov", "lr": 0.05, "momentum": 0.9},
                  "adam": {"optimizer": "adam", "lr": 1e-3},
                  "adamw": {"optimizer": "adamw", "lr": 1e-3}}


def _mlp_optimizer(names):
    def levels(cfg):
        out = []
        for name in names:
            changes = dict(MLP_OPTIMIZERS[name])
            if name == "adamw":  # decoupled decay only means something with a non-zero decay
                changes["weight_decay"] = cfg["weight_decay"] or 1e-4
            elif name != cfg["optimizer"]:
                changes["weight_decay"] = cfg["weight_decay"] if cfg["optimizer"] != "adamw" else 0.0
            if name == cfg["optimizer"]:  # the incumbent keeps its own settings (same key as before)
                changes = {"optimizer": name}
            out.append(Level(name, changes))
        return out
    return levels


def _lr_scan(factors):
    def levels(cfg):
        return [Level(f"{cfg['lr'] * f:.3g}", {"lr": float(f"{cfg['lr'] * f:.3g}")}) for f in factors]
    return levels


def _cnn_filters(cfg):
    b = cfg["base_filters"]
    return [Level("constant", {"filters": "constant"}),
            Level("double", {"filters": "double"}),
            # doubling at each pooling site (x1, x1, x2, x2, x4): the shape of CNNConfig's default
            Level(f"{b},{b},{2*b},{2*b},{4*b}", {"filters": f"{b},{b},{2*b},{2*b},{4*b}"})]


def _cnn_head(cfg):
    """Head size (none = a linear head), activation and dropout, one at a time around the incumbent head."""
    hidden, act, p = list(cfg["head_hidden"]), cfg["head_activation"], cfg["head_dropout"]
    width = hidden[0] if hidden else 128
    cands = [Level(_head_label(hidden, act, p), {}),
             Level(_head_label([], act, p), {"head_hidden": []}),
             Level(_head_label(hidden or [width], "gelu" if act != "gelu" else "tanh", p),
                   {"head_hidden": hidden or [width], "head_activation": "gelu" if act != "gelu" else "tanh"}),
             Level(_head_label(hidden or [width], act, 0.3 if p == 0 else 0.0),
                   {"head_hidden": hidden or [width], "head_dropout": 0.3 if p == 0 else 0.0})]
    seen, out = set(), []
    for lv in cands:  # an empty incumbent head would repeat some levels
        if lv.variant not in seen:
            seen.add(lv.variant)
            out.append(lv)
    return out


def _head_label(hidden, act, p):
    if not hidden:
        return "linear"
    return "-".join(map(str, hidden)) + f" {act}" + (f" p{p:g}" if p else "")


MLP_STAGES = [
    Stage("mlp_activation", "mlp", "activation",
          _fixed("activation", ["relu", "leaky_relu", "tanh", "gelu", "sigmoid"])),
    Stage("mlp_depth", "mlp", "hidden layers", _mlp_depth([1, 2, 3, 4])),
    Stage("mlp_width", "mlp", "units per hidden layer", _mlp_width([128, 256, 512])),
    Stage("mlp_dropout", "mlp", "dropout probability", _fixed("dropout", [0.0, 0.1, 0.2, 0.3, 0.5], "{:g}".format)),
    Stage("mlp_optimizer", "mlp", "optimizer", _mlp_optimizer(["sgd", "nesterov", "adam", "adamw"])),
    Stage("mlp_lr", "mlp", "learning rate", _lr_scan([1 / 3, 1, 3])),
]

CNN_STAGES = [
    Stage("cnn_pool", "cnn", "pooling", _fixed("pool", ["max", "avg", "gap"])),
    Stage("cnn_kernel", "cnn", "kernel size", _fixed("kernel_size", [3, 5, 7])),
    Stage("cnn_filters", "cnn", "filters per layer", _cnn_filters),
    Stage("cnn_init", "cnn", "initialisation", _fixed("init", ["random", "xavier", "he"])),
    Stage("cnn_head_mode", "cnn", "head training", _fixed("head_mode", ["joint", "frozen"])),
    Stage("cnn_head", "cnn", "scratch-MLP head", _cnn_head),
]

# The factors the grid settles; the final run takes these from the study and the rest (the training
# recipe: epochs, schedule, augmentation, ...) from the module's default configuration.
MLP_STUDY_FIELDS = ("activation", "hidden", "dropout", "optimizer", "lr", "momentum", "weight_decay")
CNN_STUDY_FIELDS = ("pool", "kernel_size", "filters", "init", "head_mode", "head_hidden",
                    "head_activation", "head_dropout")


# ----------------------------------------------------------------------------------------- runs

@dataclass(frozen=True)
class RunSpec:
    model: str
    study: str
    variant: str
    seed: int
    config: dict        # full config (to_dict), seed and budget applied
    budget: Budget
    final: bool = False

    @property
    def key(self) -> str:
        return run_key(self.model, self.config, self.seed, self.budget)


def run_key(model: str, config: dict, seed: int, budget: Budget) -> str:
    """Short hash of everything that defines the experiment (the device is not part of it)."""
    neutral = KEY_NEUTRAL.get(model, {})
    cfg = {k: v for k, v in config.items()
           if k != "device" and not (k in neutral and v == neutral[k])}
    blob = json.dumps({"model": model, "config": cfg, "seed": seed, "budget": budget.to_dict()},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _mlp_module():
    return importlib.import_module("mlp_scratch")


def _cnn_module():
    return importlib.import_module("cnn_torch")


def default_config(model: str) -> dict:
    mod = _mlp_module() if model == "mlp" else _cnn_module()
    return (mod.MLPConfig() if model == "mlp" else mod.CNNConfig()).to_dict()


def make_spec(model, study, variant, seed, base: dict, budget: Budget, final=False) -> RunSpec:
    cfg = json.loads(json.dumps(base))  # deep copy, JSON-clean
    cfg["seed"] = seed
    cfg["subset"] = budget.subset
    if budget.epochs is not None:
        cfg["epochs"] = budget.epochs
    # Canonicalise through the module's dataclass so the key sees exactly what training sees.
    cls = _mlp_module().MLPConfig if model == "mlp" else _cnn_module().CNNConfig
    cfg = json.loads(json.dumps(cls(**cfg).to_dict()))
    return RunSpec(model, study, variant, seed, cfg, budget, final)


def _nan_to_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, np.generic):
        return _nan_to_none(x.item())
    return x


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Registry:
    """The finished runs in <results>/runs/, keyed by run key."""

    def __init__(self, results_dir: Path):
        self.dir = Path(results_dir) / "runs"
        self.records: dict[str, dict] = {}
        self.reload()

    def reload(self) -> None:
        self.records = {}
        if self.dir.is_dir():
            for p in sorted(self.dir.glob("*.json")):
                try:
                    rec = json.loads(p.read_text())
                except (OSError, json.JSONDecodeError):
                    continue  # a foreign or broken file: the run counts as not done and reruns
                self.records[rec["key"]] = rec

    def __contains__(self, key) -> bool:
        return key in self.records

    def add(self, rec: dict) -> None:
        atomic_write_text(self.dir / f"{rec['key']}.json", json.dumps(_nan_to_none(rec), indent=1))
        self.records[rec["key"]] = rec


def _confusion(y_true, y_pred) -> np.ndarray:
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def classification_report(y_true, y_pred) -> dict:
    """Confusion matrix (rows = true class), per-class precision / recall / f1 and macro-F1."""
    cm = _confusion(y_true, y_pred)
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                   where=(precision + recall) > 0)
    return {"test_macro_f1": float(f1.mean()),
            "per_class": [{"class": CLASS_NAMES[c], "precision": float(precision[c]),
                           "recall": float(recall[c]), "f1": float(f1[c])} for c in range(NUM_CLASSES)],
            "confusion": cm.tolist()}


def _history_at(history: list[dict], epoch) -> dict:
    for h in history:
        if h.get("epoch") == epoch:
            return h
    return history[-1] if history else {}


def run_mlp(spec: RunSpec, data: Splits, device: str, models_dir: Path) -> dict:
    mlp = _mlp_module()
    cfg = mlp.MLPConfig(**spec.config)
    res = mlp.train(cfg, data.X_train, data.y_train, data.X_val, data.y_val, progress=False)
    out = {"history": res.history, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
           "diverged": bool(res.diverged), "train_seconds": res.seconds, "device": "cpu",
           "n_params": int(res.model.n_params)}
    out["val"] = mlp.evaluate(res.model, data.X_val, data.y_val)
    out["test"] = mlp.evaluate(res.model, data.X_test, data.y_test)
    # Dead units and gradient norms of the trained network (the init statistics are in init_stats.csv).
    out["layer_stats"] = mlp.layer_statistics(res.model, data.X_val[:1000], data.y_val[:1000])
    if spec.final:
        out["test_pred"] = res.model.predict(data.X_test).tolist()
        path = models_dir / "runs" / f"mlp_{spec.key}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        res.model.save(str(path))
        out["model_path"] = str(path.relative_to(models_dir.parent))
    return out


def run_cnn(spec: RunSpec, data: Splits, device: str, models_dir: Path) -> dict:
    cnn = _cnn_module()
    cfg = cnn.CNNConfig(**{**spec.config, "device": device})
    res = cnn.train(cfg, data, progress=False)
    out = {"history": res.history, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
           "diverged": bool(res.diverged), "train_seconds": res.seconds, "device": str(res.device),
           "n_params": int(res.n_params)}
    out["val"] = cnn.evaluate_classifier(res.classifier, to_images(data.X_val), data.y_val)
    out["test"] = cnn.evaluate_classifier(res.classifier, to_images(data.X_test), data.y_test)
    if spec.final:
        out["test_pred"] = np.asarray(res.classifier.predict(to_images(data.X_test))).tolist()
        path = models_dir / "runs" / f"cnn_{spec.key}"
        path.parent.mkdir(parents=True, exist_ok=True)
        res.classifier.save(str(path))
        out["model_path"] = str(path.relative_to(models_dir.parent))
    return out


RUNNERS: dict[str, Callable[[RunSpec, Splits, str, Path], dict]] = {"mlp": run_mlp, "cnn": run_cnn}


def execute(spec: RunSpec, splits: Splits, device: str, results_dir: Path) -> dict:
    """Train and evaluate one run; a divergence (returned or raised as a numeric error) is recorded."""
    data = _data_for(splits, spec.budget, spec.seed)
    t0 = time.perf_counter()
    try:
        out = RUNNERS[spec.model](spec, data, device, Path(results_dir) / "models")
        error = None
    except (FloatingPointError, ValueError, OverflowError) as e:
        out = {"history": [], "best_epoch": 0, "epochs_run": 0, "diverged": True, "device": device,
               "n_params": None, "val": {}, "test": {}}
        error = f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    hist = out.get("history") or []
    best = _history_at(hist, out.get("best_epoch"))
    epoch_secs = [h["seconds"] for h in hist if h.get("seconds") is not None]
    rec = {"key": spec.key, "model": spec.model, "study": spec.study, "variant": spec.variant,
           "seed": spec.seed, "final": spec.final, "config": spec.config, "budget": spec.budget.to_dict(),
           "n_train": len(data.y_train), "n_val": len(data.y_val), "n_test": len(data.y_test),
           "epochs_run": out.get("epochs_run"), "best_epoch": out.get("best_epoch"),
           "train_loss": best.get("train_loss"), "train_acc": best.get("train_acc"),
           "val_loss": out["val"].get("loss"), "val_acc": out["val"].get("acc"),
           "test_loss": out["test"].get("loss"), "test_acc": out["test"].get("acc"),
           "seconds": seconds, "sec_per_epoch": float(np.mean(epoch_secs)) if epoch_secs else None,
           "device": out.get("device", device), "n_params": out.get("n_params"),
           "diverged": bool(out.get("diverged")), "error": error,
           "history": hist, "layer_stats": out.get("layer_stats"),
           "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if spec.final and out.get("test_pred") is not None:
        rec["test_pred"] = out["test_pred"]
        rec["model_path"] = out.get("model_path")
        rec.update(classification_report(data.y_test, out["test_pred"]))
    return _nan_to_none(rec)


_DATA_CACHE: dict = {}


def _data_for(splits: Splits, budget: Budget, seed: int) -> Splits:
    """The run's data: a stratified subset drawn with the run's seed, so the spread over seeds also
    covers which images were drawn."""
    if budget.subset is None and budget.n_eval is None:
        return splits
    key = (id(splits), budget.subset, budget.n_eval, seed)
    if key not in _DATA_CACHE:
        if len(_DATA_CACHE) > 8:
            _DATA_CACHE.clear()
        _DATA_CACHE[key] = splits.subset(budget.subset, budget.n_eval, seed=seed)
    return _DATA_CACHE[key]


# ----------------------------------------------------------------------------------------- cost model

# Measured on the idle 2-core course CPU: MLP grid runs (256-256, 20k images x 10 epochs) in about 3 s,
# the 512-unit MLP at 28 s for 20 epochs on 54k; the CNN from benchmarks/bench_cnn.py (bf16, channels
# last: 48..192 filters 53 s and 32x5 15 s an epoch). A run costs RUN_OVERHEAD_S + image-passes x
# (2 x MACs / FLOPS + PER_IMAGE_S), where a training image counts three passes (forward, two backward
# products) and an evaluated image one; PER_IMAGE_S is the framework overhead (Python per batch, the
# numpy head, augmentation). The estimates only weight the progress bar and the printed plan.
MLP_FLOPS = 100e9
CNN_FLOPS = 3.2e11
PER_IMAGE_S = {"mlp": 1e-6, "cnn": 3e-5}
RUN_OVERHEAD_S = {"mlp": 1.0, "cnn": 3.0}


def mlp_macs(hidden: list[int], in_dim=784, out_dim=10) -> int:
    dims = [in_dim, *hidden, out_dim]
    return sum(a * b for a, b in zip(dims[:-1], dims[1:]))


_CNN_MACS_CACHE: dict = {}


def cnn_macs(cfg: dict) -> int:
    """Multiply-adds of one image through the five convolutions and the head."""
    key = json.dumps({k: cfg[k] for k in ("filters", "base_filters", "kernel_size", "pool", "head_hidden")},
                     sort_keys=True)
    if key not in _CNN_MACS_CACHE:
        cnn = _cnn_module()
        bb = cnn.build_backbone(cnn.CNNConfig(**{**cfg, "device": "cpu"}))
        _CNN_MACS_CACHE[key] = int(bb.conv_macs()) + mlp_macs(cfg["head_hidden"], bb.feature_dim)
    return _CNN_MACS_CACHE[key]


def _resolve_filters(cfg: dict) -> list[int]:
    return _cnn_module().parse_filters(cfg["filters"], cfg["base_filters"])


def _per_image_cost(model: str, cfg: dict) -> float:
    if model == "mlp":
        return 2 * mlp_macs(cfg["hidden"]) / MLP_FLOPS + PER_IMAGE_S["mlp"]
    try:
        macs = cnn_macs(cfg)
    except Exception:  # never let an estimate stop the study
        macs = 3e6
    return 2 * macs / CNN_FLOPS + PER_IMAGE_S["cnn"]


def estimate_seconds(spec: RunSpec, n_train_full=54000, n_val_full=6000, n_test_full=10000) -> float:
    cfg, b = spec.config, spec.budget
    n_train = b.subset or n_train_full
    n_val, n_test = b.n_eval or n_val_full, b.n_eval or n_test_full
    passes = cfg["epochs"] * (3 * n_train + n_val) + n_val + n_test
    return RUN_OVERHEAD_S[spec.model] + passes * _per_image_cost(spec.model, cfg)


# ----------------------------------------------------------------------------------------- the study

@dataclass
class Options:
    results_dir: Path = Path("results")
    quick: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    only: str | None = None         # "mlp" | "cnn" | None
    shard: tuple[int, int] = (0, 1)
    device: str = "auto"
    report: bool = True
    plots: bool = True


def choose(stage_records: dict[str, list[dict]], incumbent: str) -> str:
    """The level with the best mean val accuracy; a level with a diverged seed cannot win, and the
    incumbent keeps its place on a tie."""
    best, best_acc = incumbent, -1.0
    scores = {}
    for variant, recs in stage_records.items():
        if any(r["diverged"] for r in recs) or any(r["val_acc"] is None for r in recs):
            continue
        scores[variant] = float(np.mean([r["val_acc"] for r in recs]))
    if incumbent in scores:
        best_acc = scores[incumbent]
    for variant, acc in scores.items():
        if acc > best_acc + 1e-12:
            best, best_acc = variant, acc
    return best


def _apply(cfg: dict, changes: dict) -> dict:
    out = json.loads(json.dumps(cfg))
    out.update(json.loads(json.dumps(changes)))
    return out


def _scale_filters(chosen: dict, first: int) -> str:
    """The chosen filter shape (ratios to the first layer) with `first` filters in the first layer."""
    shape = _resolve_filters(chosen)
    return ",".join(str(max(1, round(first * c / shape[0]))) for c in shape)


def _final_filters(chosen: dict, reference: dict, widest_first: int) -> str:
    """The chosen filter shape at the widest first layer (<= widest_first) whose multiply-adds, with the
    chosen kernel, pooling and head, do not exceed those of the reference at that width."""
    limit = cnn_macs({**reference, "filters": _scale_filters(reference, widest_first)})
    for first in range(widest_first, 1, -1):
        filters = _scale_filters(chosen, first)
        if cnn_macs({**chosen, "filters": filters}) <= limit:
            return filters
    return _scale_filters(chosen, 1)


def _incumbent_variant(levels: list[Level], cfg: dict) -> str:
    for lv in levels:
        if all(cfg.get(k) == v for k, v in lv.changes.items()):
            return lv.variant
    return levels[0].variant


def load_manifest(results_dir: Path) -> dict:
    path = Path(results_dir) / "manifest.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    return {"runs": [], "winners": {}}


def study_records(results_dir: Path) -> tuple[list[dict], dict]:
    """Finished runs as members of their comparisons (a shared run once per comparison), and the winners.
    Without a manifest, every run under its own label."""
    registry = Registry(results_dir).records
    manifest = load_manifest(results_dir)
    if not manifest["runs"]:
        return list(registry.values()), {}
    out = []
    for row in manifest["runs"]:
        rec = registry.get(row["key"])
        if rec is not None:
            out.append({**rec, "study": row["study"], "variant": row["variant"]})
    return out, manifest["winners"]


class Study:
    """Runs the stages of the two tracks; every decision is re-derived from the saved runs."""

    def __init__(self, opts: Options, splits: Splits, plan: Plan, *, extra_runs: list[RunSpec] = (),
                 log=print):
        self.opts, self.splits, self.plan = opts, splits, plan
        self.results_dir = Path(opts.results_dir)
        self.registry = Registry(self.results_dir)
        self.extra_runs = list(extra_runs)
        self.log = log
        self.executed: list[str] = []   # keys trained in this invocation (tests read it)
        self.seen: set[str] = set()
        self.manifest: list[dict] = []  # (study, variant, seed, key) of every stage member, in order
        self.winners: dict[str, str] = {}
        self.skipped: list[str] = []
        self.blocked: list[str] = []    # tracks that wait for other shards' runs
        self.bar = None

    # ---- the plan
    def tracks(self) -> list[str]:
        return [m for m in ("mlp", "cnn") if self.opts.only in (None, m)]

    def grid_base(self, model: str) -> dict:
        over = self.plan.mlp_grid_overrides if model == "mlp" else self.plan.cnn_grid_overrides
        return _apply(default_config(model), over)

    def stages(self, model: str) -> list[Stage]:
        return MLP_STAGES if model == "mlp" else CNN_STAGES

    def stage_specs(self, stage: Stage, incumbent: dict) -> tuple[list[RunSpec], list[Level]]:
        budget = self.plan.mlp_grid if stage.model == "mlp" else self.plan.cnn_grid
        levels = stage.levels(incumbent)
        if self.plan.max_levels:
            own = _incumbent_variant(levels, incumbent)
            levels = [lv for i, lv in enumerate(levels) if i < self.plan.max_levels or lv.variant == own]
        specs = [make_spec(stage.model, stage.study, lv.variant, seed, _apply(incumbent, lv.changes), budget)
                 for lv in levels for seed in self.opts.seeds]
        return specs, levels

    def final_specs(self, model: str, chosen: dict) -> list[RunSpec]:
        """The chosen factors with the module default's training recipe (epochs, schedule, BatchNorm,
        augmentation, ...), at full budget. The CNN's filter shape is scaled to the default's compute.

        A short grid favours what learns fastest, so the module's default configuration (tuned by hand on
        validation) is trained beside the study's choice when they differ, and the better of the two on
        validation becomes the final model."""
        fields_ = MLP_STUDY_FIELDS if model == "mlp" else CNN_STUDY_FIELDS
        default = default_config(model)
        over = self.plan.mlp_final_overrides if model == "mlp" else self.plan.cnn_final_overrides
        budget = self.plan.mlp_final if model == "mlp" else self.plan.cnn_final
        changes = {k: chosen[k] for k in fields_}
        if model == "cnn":
            reference = _apply(default, CNN_FINAL_REFERENCE)
            widest = self.plan.cnn_final_first_filters or _resolve_filters(reference)[0]
            changes["filters"] = _final_filters(_apply(default, changes), reference, widest)
        study_cfg = _apply(_apply(default, changes), over)
        specs = [make_spec(model, f"{model}_final", "study choice", 0, study_cfg, budget, final=True)]
        default_cfg = _apply(default, over)
        if any(study_cfg[k] != default_cfg[k] for k in fields_):
            specs.append(make_spec(model, f"{model}_final", "module default", 0, default_cfg, budget, final=True))
        return specs

    def expected_plan(self) -> list[tuple[str, int, float]]:
        """(study, runs, expected seconds) per stage, levels estimated around the starting config."""
        rows = []
        for model in self.tracks():
            cfg = self.grid_base(model)
            keys = set()
            for stage in self.stages(model):
                specs, _ = self.stage_specs(stage, cfg)
                new = [s for s in specs if s.key not in keys]
                keys.update(s.key for s in specs)
                rows.append((stage.study, len(new), sum(estimate_seconds(s) for s in new)))
            specs = self.final_specs(model, cfg)
            rows.append((f"{model}_final", len(specs), sum(estimate_seconds(s) for s in specs)))
        return rows

    def mine(self, specs: list[RunSpec]) -> list[RunSpec]:
        i, n = self.opts.shard
        return [s for j, s in enumerate(specs) if j % n == i]

    # ---- execution
    def run_specs(self, specs: list[RunSpec]) -> None:
        self.manifest += [{"model": s.model, "study": s.study, "variant": s.variant, "seed": s.seed,
                           "key": s.key} for s in specs]
        for spec in self.mine(specs):
            est = estimate_seconds(spec)
            first_time = spec.key not in self.seen
            self.seen.add(spec.key)
            if spec.key in self.registry:
                if first_time:
                    self.skipped.append(spec.key)
                if self.bar is not None and first_time:
                    # keep the remaining-time estimate honest: skipped work leaves the total (shown at
                    # the next update: a refresh per skipped run would print a line each when resuming)
                    self.bar.total = max(self.bar.total - est, self.bar.n)
                continue
            rec = execute(spec, self.splits, self.opts.device, self.results_dir)
            self.registry.add(rec)
            self.executed.append(spec.key)
            if self.bar is not None:
                self.bar.total = max(self.bar.total, self.bar.n + est)  # an unplanned run (e.g. injected)
                self.bar.update(est)
            self._log_run(rec)

    def _log_run(self, rec: dict) -> None:
        def f(x):
            return "   nan" if x is None else f"{x:.4f}"
        flag = "  DIVERGED" + (f" ({rec['error']})" if rec.get("error") else "") if rec["diverged"] else ""
        msg = (f"{rec['study']:<15} {rec['variant']:<22} seed {rec['seed']}  val {f(rec['val_acc'])}  "
               f"test {f(rec['test_acc'])}  {rec['seconds']:6.1f}s  {rec['key']}{flag}")
        if self.bar is not None:
            self.bar.write(msg)
        else:
            self.log(msg)

    def stage_done(self, specs: list[RunSpec]) -> bool:
        return all(s.key in self.registry for s in specs)

    def run_track(self, model: str) -> dict | None:
        """Settle each factor in turn; returns the chosen grid config, or None if blocked on shards."""
        cfg = self.grid_base(model)
        for stage in self.stages(model):
            specs, levels = self.stage_specs(stage, cfg)
            self.run_specs(specs)
            if not self.stage_done(specs):
                self.blocked.append(f"{model} (at {stage.study})")
                return None
            by_variant: dict[str, list[dict]] = {}
            for s in specs:
                by_variant.setdefault(s.variant, []).append(self.registry.records[s.key])
            winner = choose(by_variant, _incumbent_variant(levels, cfg))
            self.winners[stage.study] = winner
            cfg = _apply(cfg, next(lv.changes for lv in levels if lv.variant == winner))
        return cfg

    def run(self) -> None:
        from tqdm import tqdm
        rows = self.expected_plan()
        self.print_plan(rows)
        total = sum(r[2] for r in rows) + sum(estimate_seconds(s) for s in self.extra_runs)
        self.bar = tqdm(total=total, unit="s", desc="study", dynamic_ncols=True, smoothing=0.05,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} planned s "
                                   "[{elapsed}<{remaining}]")
        try:
            if self.extra_runs:
                self.run_specs(self.extra_runs)
            chosen = {m: self.run_track(m) for m in self.tracks()}
            for m in self.tracks():
                if chosen[m] is not None:
                    self.run_specs(self.final_specs(m, chosen[m]))
        finally:
            self.bar.close()
            self.bar = None
            self.write_manifest()

    def write_manifest(self) -> None:
        """manifest.json: which runs make up each comparison. A run shared by two stages (the incumbent
        level) belongs to both; tables and plots are built from this, not from the runs' first labels.
        Rows of tracks not run now (--only) are kept from the previous manifest."""
        old = load_manifest(self.results_dir)
        keep = [r for r in old["runs"] if r["model"] not in self.tracks()]
        winners = {k: v for k, v in old["winners"].items() if not k.startswith(tuple(self.tracks()))}
        seen, rows = set(), []
        for r in keep + self.manifest:
            ident = (r["study"], r["variant"], r["seed"], r["key"])
            if ident not in seen:
                seen.add(ident)
                rows.append(r)
        atomic_write_text(self.results_dir / "manifest.json",
                          json.dumps({"runs": rows, "winners": {**winners, **self.winners}}, indent=1))


    def print_plan(self, rows) -> None:
        i, n = self.opts.shard
        self.log(f"Study plan ({'quick' if self.plan.quick else 'full'}; seeds {list(self.opts.seeds)}"
                 f"{f'; shard {i}/{n}' if n > 1 else ''}); expected time on the 2-core course CPU:")
        for study, runs, sec in rows:
            self.log(f"  {study:<16} {runs:3d} runs  ~{sec / 60:5.1f} min")
        self.log(f"  {'total':<16} {sum(r[1] for r in rows):3d} runs  ~{sum(r[2] for r in rows) / 60:5.1f} min"
                 f"  (before skipping runs already in {self.results_dir / 'runs'})")


# ----------------------------------------------------------------------------------------- init stats

INIT_STATS_COLUMNS = ["model", "scheme", "layer", "act_mean", "act_std", "dead_frac", "grad_norm"]


def compute_init_stats(splits: Splits, plan: Plan, n_images: int = 1000) -> list[dict]:
    """Per-layer statistics at initialisation: MLP per init (ReLU) and per activation (default init),
    CNN per init. The MLP is four hidden layers deep (the deepest in the grid) so trends show."""
    mlp = _mlp_module()
    rows = []
    X, y = splits.X_train[:n_images], splits.y_train[:n_images]
    base = _apply(default_config("mlp"), plan.mlp_grid_overrides)
    width = base["hidden"][0] if base["hidden"] else 256
    for scheme in ("random", "xavier", "he"):
        model = mlp.MLP(784, [width] * 4, 10, activation="relu", dropout=0.0, init=scheme, seed=0)
        model = _mlp_standardize(model, splits, base)
        for r in mlp.layer_statistics(model, X, y):
            rows.append({"model": "mlp", "scheme": scheme, **r})
    for act in ("relu", "leaky_relu", "tanh", "gelu", "sigmoid"):
        model = mlp.MLP(784, [width] * 4, 10, activation=act, dropout=0.0, init=base["init"], seed=0)
        model = _mlp_standardize(model, splits, base)
        for r in mlp.layer_statistics(model, X, y):
            rows.append({"model": "mlp", "scheme": act, **r})
    cnn = _cnn_module()
    cbase = _apply(default_config("cnn"), plan.cnn_grid_overrides)  # as the grid trains it
    n_cnn = min(n_images, 256)  # a CNN forward+backward on a CPU: keep it to a second
    for scheme in ("random", "xavier", "he"):
        cfg = cnn.CNNConfig(**{**cbase, "init": scheme, "seed": 0})
        for r in cnn.init_statistics(cfg, to_images(X[:n_cnn]), y[:n_cnn]):
            rows.append({"model": "cnn", "scheme": scheme, **r})
    return [{k: _nan_to_none(r.get(k)) for k in INIT_STATS_COLUMNS} for r in rows]


def _mlp_standardize(model, splits: Splits, cfg: dict):
    """Give a fresh MLP the input standardisation its training would use, so statistics match."""
    if cfg.get("standardize") and hasattr(model, "input_mean"):
        model.input_mean, model.input_std = preprocessing.standardization_stats(splits.X_train)
    return model


# ----------------------------------------------------------------------------------------- tables

CSV_COLUMNS_HEAD = ["study", "variant", "seed"]
CSV_COLUMNS_TAIL = ["epochs_run", "best_epoch", "train_loss", "train_acc", "val_loss", "val_acc",
                    "test_loss", "test_acc", "seconds", "sec_per_epoch", "device", "n_params",
                    "diverged", "key", "n_eval", "error"]
CURVE_COLUMNS = ["key", "study", "variant", "seed", "epoch", "lr", "train_loss", "train_acc",
                 "val_loss", "val_acc"]
STUDY_ORDER = [s.study for s in MLP_STAGES] + ["mlp_final"] + [s.study for s in CNN_STAGES] + ["cnn_final"]


def _cell(v):
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v)) if v else "none"
    return v


def _sorted_records(records) -> list[dict]:
    order = {s: i for i, s in enumerate(STUDY_ORDER)}
    return sorted(records, key=lambda r: (order.get(r["study"], 99), r["study"]))  # stable: manifest order


def write_tables(results_dir: Path, records: list[dict]) -> None:
    import pandas as pd
    results_dir = Path(results_dir)
    for model in ("mlp", "cnn"):
        recs = [r for r in _sorted_records(records) if r["model"] == model]
        cfg_fields = []
        for r in recs:
            cfg_fields += [k for k in r["config"] if k not in cfg_fields and k not in ("seed", "device")]
        rows = []
        for r in recs:
            row = {k: r.get(k) for k in CSV_COLUMNS_HEAD}
            row.update({k: _cell(r["config"].get(k)) for k in cfg_fields})
            row.update({k: r.get(k) for k in CSV_COLUMNS_TAIL if k != "n_eval"})
            row["n_eval"] = r["budget"].get("n_eval")
            rows.append(row)
        cols = CSV_COLUMNS_HEAD + cfg_fields + CSV_COLUMNS_TAIL
        _atomic_csv(pd.DataFrame(rows, columns=cols), results_dir / f"{model}_runs.csv")
    curves = [{"key": r["key"], "study": r["study"], "variant": r["variant"], "seed": r["seed"],
               **{k: h.get(k) for k in CURVE_COLUMNS[4:]}}
              for r in _sorted_records(records) for h in r.get("history") or []]
    _atomic_csv(pd.DataFrame(curves, columns=CURVE_COLUMNS), results_dir / "curves.csv")


def _atomic_csv(df, path: Path) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def study_table(records: list[dict], study: str) -> list[dict]:
    """Per variant of one study: mean and std over seeds of val/train/test accuracy, in run order."""
    groups: dict[str, list[dict]] = {}
    for r in (r for r in records if r["study"] == study):
        groups.setdefault(r["variant"], []).append(r)
    out = []
    for variant, recs in groups.items():
        row = {"variant": variant, "n": len(recs), "diverged": sum(r["diverged"] for r in recs)}
        for m in ("val_acc", "train_acc", "test_acc", "sec_per_epoch", "n_params"):
            vals = [r[m] for r in recs if r.get(m) is not None]
            row[m] = float(np.mean(vals)) if vals else None
            row[m + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        out.append(row)
    return out


def _final_record(records: list[dict], model: str) -> dict | None:
    """The final model: the full-budget run with the best validation accuracy."""
    finals = [r for r in records if r["model"] == model and r.get("final") and not r["diverged"]
              and r.get("test_pred") is not None]
    return max(finals, key=lambda r: r["val_acc"]) if finals else None


def _versions() -> dict:
    v = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform()}
    for name in ("torch", "pandas", "matplotlib"):
        try:
            v[name] = importlib.import_module(name).__version__
        except ImportError:
            pass
    return v


def grid_budget_text(plan: Plan) -> dict:
    def b(bud: Budget, over: dict) -> str:
        s = (f"{bud.subset or 54000} training images (stratified, drawn per seed), "
             f"{'all' if bud.n_eval is None else bud.n_eval} val/test images, "
             f"{bud.epochs if bud.epochs is not None else 'the default number of'} epochs")
        if over:
            s += "; grid-only settings: " + ", ".join(f"{k}={_cell(v)}" for k, v in over.items())
        return s
    return {"mlp": b(plan.mlp_grid, plan.mlp_grid_overrides),
            "cnn": b(plan.cnn_grid, plan.cnn_grid_overrides),
            "design": "one factor at a time, sequentially: each stage's winner (best mean validation "
                      "accuracy over seeds) is kept for the next stage; not a full product of factors",
            "final": "the chosen factors with the module default's training recipe (its epochs, schedule, "
                     "batch size and, for the CNN, BatchNorm and augmentation), all 54k training images, "
                     "seed 0; also the module's default configuration, the better on validation "
                     "kept; the CNN's chosen filter shape scaled to the widest first layer (at most "
                     f"{plan.cnn_final_first_filters or 'the reference'}'s) whose multiply-adds do not exceed those of "
                     f"the reference architecture {CNN_FINAL_REFERENCE}"
                     + (" (quick: small subset)" if plan.quick else "")}


def write_summary(results_dir: Path, records: list[dict], plan: Plan, opts: Options,
                  wall_seconds: float | None, winners: dict | None = None) -> dict:
    results_dir = Path(results_dir)
    summary: dict = {}
    for model in ("mlp", "cnn"):
        rec = _final_record(records, model)
        if rec is None:
            continue
        try:
            default = default_config(model)
        except Exception:
            default = None
        fields_ = MLP_STUDY_FIELDS if model == "mlp" else CNN_STUDY_FIELDS
        summary[model] = {
            "config": rec["config"], "val_acc": rec["val_acc"], "test_acc": rec["test_acc"],
            "test_macro_f1": rec["test_macro_f1"], "per_class": rec["per_class"],
            "confusion": rec["confusion"], "train_seconds": rec["seconds"],
            "epochs_run": rec["epochs_run"], "n_params": rec["n_params"],
            # additions to the contract: which final variant won, and whether it is the module default
            "variant": rec["variant"], "key": rec["key"],
            "matches_module_default": (None if default is None else
                                       all(rec["config"].get(k) == default.get(k) for k in fields_)),
            "finals": [{"variant": r["variant"], "val_acc": r["val_acc"], "test_acc": r["test_acc"],
                        "seconds": r["seconds"], "key": r["key"]}
                       for r in records if r["model"] == model and r.get("final")],
        }
    # A run shared by two stages appears once per stage in `records`: count each run once.
    grid_secs = sum({r["key"]: r["seconds"] or 0.0 for r in records}.values())
    summary["study"] = {
        "quick": plan.quick, "seconds": grid_secs, "wall_seconds_last_invocation": wall_seconds,
        "seeds": sorted({r["seed"] for r in records if not r.get("final")}) or list(opts.seeds),
        "device": ", ".join(sorted({r["device"] for r in records if r.get("device")})),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(), "grid_budget": grid_budget_text(plan),
        "n_runs": len(records), "n_diverged": sum(r["diverged"] for r in records),
        "chosen_by": "mean validation accuracy over seeds; test accuracy only reported",
        "winners": winners or {},  # per grid stage, the level kept for the next stage
    }
    atomic_write_text(results_dir / "summary.json", json.dumps(_nan_to_none(summary), indent=1))
    return summary


def copy_best_models(results_dir: Path, records: list[dict]) -> None:
    """models/mlp_best.npz and models/cnn_best/: copies of the final runs chosen by val accuracy."""
    results_dir = Path(results_dir)
    for model, dest in (("mlp", results_dir / "models" / "mlp_best.npz"),
                        ("cnn", results_dir / "models" / "cnn_best")):
        rec = _final_record(records, model)
        if rec is None or not rec.get("model_path"):
            continue
        src = results_dir / rec["model_path"]
        if not src.exists():
            continue
        tmp = dest.with_name(dest.name + ".tmp")
        if tmp.is_dir():
            shutil.rmtree(tmp)
        if src.is_dir():
            shutil.copytree(src, tmp)
        else:
            shutil.copy2(src, tmp)
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(tmp, dest)


# ----------------------------------------------------------------------------------------- figures

FIGURES = ["learning_curves.png", "compare_mlp.png", "compare_cnn.png",
           *[f"compare_{s.study}.png" for s in MLP_STAGES + CNN_STAGES],
           "init_stats_mlp_init.png", "init_stats_mlp_activation.png", "init_stats_cnn_init.png",
           "confusion_mlp.png", "confusion_cnn.png", "per_class_accuracy.png",
           "misclassified_mlp.png", "misclassified_cnn.png", "class_samples.png", "cnn_filters.png"]

def make_figures(results_dir: Path, records: list[dict], splits: Splits | None) -> list[Path]:
    """Every figure from saved results (run files, init_stats.csv, the saved final models)."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    import pandas as pd

    fig_dir = Path(results_dir) / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name):
        path = fig_dir / name
        fig.tight_layout()
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=150)
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)

    finals = {m: _final_record(records, m) for m in ("mlp", "cnn")}

    # Learning curves of the final models.
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for row, model in enumerate(("mlp", "cnn")):
        rec = finals[model]
        for col, metric in enumerate(("loss", "acc")):
            ax = axes[row, col]
            if rec and rec.get("history"):
                ep = [h["epoch"] for h in rec["history"]]
                ax.plot(ep, [h[f"train_{metric}"] for h in rec["history"]], "o-", label="train")
                ax.plot(ep, [h[f"val_{metric}"] for h in rec["history"]], "s-", label="validation")
                if rec.get("best_epoch") in ep:
                    ax.axvline(rec["best_epoch"], color="grey", ls=":", label="best epoch (restored)")
                ax.legend()
            ax.set_xlabel("epoch")
            ax.set_ylabel("cross-entropy loss" if metric == "loss" else "accuracy")
            ax.set_title(f"{model.upper()} final: {'loss' if metric == 'loss' else 'accuracy'}")
            ax.grid(alpha=0.3)
    save(fig, "learning_curves.png")

    # One bar chart per comparison, and one overview per track.
    factor = {s.study: s.factor for s in MLP_STAGES + CNN_STAGES}
    for model, stages in (("mlp", MLP_STAGES), ("cnn", CNN_STAGES)):
        present = [s.study for s in stages if any(r["study"] == s.study for r in records)]
        for study in present:
            fig, ax = plt.subplots(figsize=(7, 4))
            _bar(ax, study_table(records, study), factor[study], study)
            save(fig, f"compare_{study}.png")
        n = max(len(present), 1)
        ncol = 3
        fig, axes = plt.subplots((n + ncol - 1) // ncol, ncol, figsize=(15, 3.8 * ((n + ncol - 1) // ncol)),
                                 squeeze=False)
        for ax, study in zip(axes.flat, present):
            _bar(ax, study_table(records, study), factor[study], study)
        for ax in list(axes.flat)[len(present):]:
            ax.axis("off")
        save(fig, f"compare_{model}.png")

    # Per-layer statistics at initialisation.
    stats_path = Path(results_dir) / "init_stats.csv"
    stats = pd.read_csv(stats_path) if stats_path.exists() else pd.DataFrame(columns=INIT_STATS_COLUMNS)
    for name, model, schemes in (("init_stats_mlp_init.png", "mlp", ["random", "xavier", "he"]),
                                 ("init_stats_mlp_activation.png", "mlp",
                                  ["relu", "leaky_relu", "tanh", "gelu", "sigmoid"]),
                                 ("init_stats_cnn_init.png", "cnn", ["random", "xavier", "he"])):
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for scheme in schemes:
            d = stats[(stats["model"] == model) & (stats["scheme"] == scheme)].sort_values("layer")
            if d.empty:
                continue
            for ax, col in zip(axes, ("act_std", "grad_norm", "dead_frac")):
                ax.plot(d["layer"], d[col], "o-", label=scheme)
        what = "conv layer" if model == "cnn" else "hidden layer"
        for ax, col, title in zip(axes, ("act_std", "grad_norm", "dead_frac"),
                                  ("activation std", "gradient norm ||dL/dW||", "dead-unit fraction")):
            ax.set_xlabel(what)
            ax.set_ylabel(title)
            ax.set_title(f"{model.upper()} at initialisation: {title}")
            if col != "dead_frac":
                ax.set_yscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, name)

    # Confusion matrices, per-class accuracy.
    for model in ("mlp", "cnn"):
        rec = finals[model]
        fig, ax = plt.subplots(figsize=(7.5, 6.5))
        if rec:
            cm = np.asarray(rec["confusion"])
            im = ax.imshow(cm, cmap="Blues")
            for i in range(NUM_CLASSES):
                for j in range(NUM_CLASSES):
                    ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > cm.max() / 2 else "black")
            fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_title(f"{model.upper()} confusion on the test set (acc {rec['test_acc']:.4f})")
        ax.set_xticks(range(NUM_CLASSES), CLASS_NAMES, rotation=45, ha="right")
        ax.set_yticks(range(NUM_CLASSES), CLASS_NAMES)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        save(fig, f"confusion_{model}.png")

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.4
    for i, model in enumerate(("mlp", "cnn")):
        rec = finals[model]
        if rec:
            recall = [c["recall"] for c in rec["per_class"]]
            ax.bar(np.arange(NUM_CLASSES) + (i - 0.5) * width, recall, width,
                   label=f"{model.upper()} (test acc {rec['test_acc']:.3f})")
    ax.set_xticks(range(NUM_CLASSES), CLASS_NAMES, rotation=30, ha="right")
    ax.set_ylabel("per-class test accuracy (recall)")
    ax.set_xlabel("class")
    ax.set_ylim(0.5, 1.0)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    save(fig, "per_class_accuracy.png")

    # Images: galleries, samples, filters.
    if splits is not None:
        for model in ("mlp", "cnn"):
            rec = finals[model]
            fig, axes = plt.subplots(4, 8, figsize=(12, 7))
            if rec:
                y_true = splits.y_test if rec["n_test"] == len(splits.y_test) else None
                pred = np.asarray(rec["test_pred"])
                if y_true is None:  # a quick run evaluated a test subset: redraw it the same way
                    y_true = _data_for(splits, Budget(**rec["budget"]), rec["seed"]).y_test
                    X_test = _data_for(splits, Budget(**rec["budget"]), rec["seed"]).X_test
                else:
                    X_test = splits.X_test
                wrong = np.flatnonzero(pred != y_true)[:32]
                for ax, i in zip(axes.flat, wrong):
                    ax.imshow(X_test[i].reshape(28, 28), cmap="gray_r")
                    ax.set_title(f"true {CLASS_NAMES[y_true[i]]}\npred {CLASS_NAMES[pred[i]]}", fontsize=7)
            for ax in axes.flat:
                ax.axis("off")
            fig.suptitle(f"{model.upper()}: misclassified test images (first 32 in test order)")
            save(fig, f"misclassified_{model}.png")

        fig, axes = plt.subplots(NUM_CLASSES, 8, figsize=(8, 10.5))
        for c in range(NUM_CLASSES):
            idx = np.flatnonzero(splits.y_train == c)[:8]
            for j, i in enumerate(idx):
                axes[c, j].imshow(splits.X_train[i].reshape(28, 28), cmap="gray_r")
                axes[c, j].set_xticks([])
                axes[c, j].set_yticks([])
            axes[c, 0].set_ylabel(CLASS_NAMES[c], rotation=0, ha="right", va="center", fontsize=8)
        fig.suptitle("Fashion-MNIST: eight training images per class")
        save(fig, "class_samples.png")

    fig = _filters_figure(results_dir, plt)
    save(fig, "cnn_filters.png")
    return written


def _bar(ax, table: list[dict], xlabel: str, title: str) -> None:
    if not table:
        ax.axis("off")
        return
    x = np.arange(len(table))
    val = np.array([r["val_acc"] if r["val_acc"] is not None else np.nan for r in table])
    val_sd = np.array([r["val_acc_std"] or 0.0 for r in table])
    tr = np.array([r["train_acc"] if r["train_acc"] is not None else np.nan for r in table])
    tr_sd = np.array([r["train_acc_std"] or 0.0 for r in table])
    ax.bar(x - 0.2, tr, 0.4, yerr=tr_sd, capsize=3, color="#bbbbbb", label="train (mean ± std)")
    ax.bar(x + 0.2, val, 0.4, yerr=val_sd, capsize=3, color="#1f77b4", label="validation (mean ± std)")
    if np.isfinite(val).any():
        best = int(np.nanargmax(val))
        ax.bar(x[best] + 0.2, val[best], 0.4, fill=False, edgecolor="red", lw=2, label="best val")
        finite = np.concatenate([val[np.isfinite(val)] - val_sd[np.isfinite(val)],
                                 tr[np.isfinite(tr)] - tr_sd[np.isfinite(tr)]])
        hi = np.nanmax(np.concatenate([val + val_sd, tr + tr_sd]))
        lo = max(0.0, float(finite.min()) - 0.02)
        ax.set_ylim(lo, min(1.0, hi + 0.01) if hi > lo else lo + 0.05)
    labels = [r["variant"] + (" (diverged)" if r["diverged"] else "") for r in table]
    ax.set_xticks(x, labels, rotation=20 if len(table) > 3 else 0, ha="right" if len(table) > 3 else "center",
                  fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    n = max(r["n"] for r in table)
    ax.set_title(f"{title} ({n} seed{'s' if n > 1 else ''})", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)


def _filters_figure(results_dir: Path, plt):
    path = Path(results_dir) / "models" / "cnn_best"
    weight = None
    if path.exists():
        try:
            import torch
            clf = _cnn_module().load_classifier(str(path))
            conv = next(m for m in clf.backbone.modules() if isinstance(m, torch.nn.Conv2d))
            weight = conv.weight.detach().cpu().numpy()[:, 0]  # (C_out, k, k)
        except Exception as e:  # the figure says why instead of failing the study
            print(f"cnn_filters.png: could not load {path}: {e}", file=sys.stderr)
    n = len(weight) if weight is not None else 1
    ncol = min(8, n)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.4 * ncol + 0.5, 1.4 * nrow + 0.8), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if weight is not None and i < n:
            w = weight[i]
            lim = np.abs(w).max() or 1.0
            ax.imshow(w, cmap="bwr", vmin=-lim, vmax=lim)
            ax.set_title(f"filter {i}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("CNN first-layer filters (red +, blue -)" if weight is not None else "no CNN model saved")
    return fig


# ----------------------------------------------------------------------------------------- driver

def rebuild_outputs(opts: Options, plan: Plan, splits: Splits | None, wall_seconds=None) -> dict:
    """CSVs, models/*_best, summary.json and figures from the saved runs; no training."""
    records, winners = study_records(opts.results_dir)
    write_tables(opts.results_dir, records)
    copy_best_models(opts.results_dir, records)
    summary = write_summary(opts.results_dir, records, plan, opts, wall_seconds, winners)
    if opts.plots:
        make_figures(opts.results_dir, records, splits)
    return summary


def build_report(results_dir: Path) -> bool:
    if importlib.util.find_spec("report") is None or importlib.util.find_spec("report.build") is None:
        print("report/build.py not found: skipping the report", file=sys.stderr)
        return False
    importlib.import_module("report.build").build_report(results_dir)
    return True


def run_study(opts: Options, *, splits: Splits | None = None, extra_runs: list[RunSpec] = (),
              plan: Plan | None = None, log=print) -> Study:
    """Train every run not yet in <results>/runs, then rebuild all outputs. `plan` defaults to the
    full or quick plan as opts.quick says; `extra_runs` are trained first (tests inject runs)."""
    t0 = time.perf_counter()
    plan = plan or (QUICK_PLAN if opts.quick else FULL_PLAN)
    splits = splits if splits is not None else preprocessing.load_splits()
    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    if opts.shard[0] == 0:  # the init statistics are cheap and the same in every shard
        import pandas as pd
        _atomic_csv(pd.DataFrame(compute_init_stats(splits, plan), columns=INIT_STATS_COLUMNS),
                    results_dir / "init_stats.csv")
    study = Study(opts, splits, plan, extra_runs=extra_runs, log=log)
    study.run()
    if study.blocked:
        log("Waiting for other shards: " + ", ".join(study.blocked) + ". Copy every shard's runs/*.json "
            "into one runs/ folder and start again; finished runs are skipped.")
    rebuild_outputs(opts, plan, splits, wall_seconds=time.perf_counter() - t0)
    log(f"Study done in {(time.perf_counter() - t0) / 60:.1f} min: {len(study.executed)} runs trained, "
        f"{len(study.skipped)} already done; results in {results_dir}")
    return study


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="whole pipeline on a small subset with 1-2 epochs, every output, < 3 min (default: off)")
    p.add_argument("--plots-only", action="store_true",
                   help="rebuild CSVs, summary.json and figures from <results-dir>/runs without training")
    p.add_argument("--results-dir", default="results", help="output folder (default: results)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds of every grid level (default: 0,1,2; with --quick 0,1)")
    p.add_argument("--only", choices=("mlp", "cnn"), default=None, help="run one track only (default: both)")
    p.add_argument("--shard", default="0/1",
                   help="i/n: run every n-th run of each stage starting at i (i counts from 0); merge shards "
                        "by copying their runs/*.json into one folder (default: 0/1)")
    p.add_argument("--device", default="auto", help="CNN device: auto, cpu, cuda, mps (default: auto)")
    p.add_argument("--no-report", action="store_true", help="do not build the report at the end (default: build)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: preprocessing's search)")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = ",".join(map(str, QUICK_SEEDS if args.quick else (0, 1, 2)))
    try:
        args.seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        i, n = (int(x) for x in args.shard.split("/"))
        if not (n >= 1 and 0 <= i < n):
            raise ValueError
        args.shard = (i, n)
    except ValueError:
        p.error(f"bad --seeds {args.seeds!r} or --shard {args.shard!r} (expected e.g. 0,1,2 and 0/2)")
    if not args.seeds:
        p.error("--seeds needs at least one seed")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    opts = Options(results_dir=Path(args.results_dir), quick=args.quick, seeds=args.seeds, only=args.only,
                   shard=args.shard, device=args.device, report=not args.no_report)
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    try:
        splits = preprocessing.load_splits(args.data_dir)
    except preprocessing.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.plots_only:
        if not (opts.results_dir / "runs").is_dir():
            print(f"error: no runs in {opts.results_dir / 'runs'}; run the study first", file=sys.stderr)
            return 1
        old = opts.results_dir / "summary.json"
        if old.exists() and json.loads(old.read_text()).get("study", {}).get("quick"):
            plan = QUICK_PLAN  # the budgets the saved runs were trained with
        rebuild_outputs(opts, plan, splits)
        print(f"Rebuilt tables, summary.json and figures in {opts.results_dir}")
    else:
        run_study(opts, splits=splits)
    if opts.report and opts.shard[1] == 1:
        try:
            build_report(opts.results_dir)
        except Exception as e:  # the results are saved; a report failure must not hide them
            print(f"error: building the report failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
