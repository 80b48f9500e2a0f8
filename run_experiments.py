"""The hyperparameter study: assignment Q2f (MLP), Q3a-d (CNN) and the evidence for Q4.

    python run_experiments.py                        # the full study on a local Dask cluster
    python run_experiments.py --quick --results-dir results-quick   # every output, small data, a few minutes
    python run_experiments.py --plots-only           # rebuild CSVs, summary.json and figures from results/runs/
    python run_experiments.py --scheduler tcp://HOST:8786           # send the runs to an existing Dask cluster

The report is built from the results afterwards (`python -m report.build`; `make study` runs both).

Design:
- Each track's grid begins at START, the start configuration stated whole below (not the module defaults,
  which hold the study's answer). A stage (STAGES) varies one factor; everything else stays the incumbent's
  (the winner so far). The grid trains on a reduced budget (Plan), the same for every level of a stage.
- Ordered factors (depth, width, dropout, learning rate, kernel, head width) have a level on each side of the
  incumbent; a winner at the edge of its range gets one more level beyond it, and if it still wins there the
  manifest flags the stage ("edge"). The CNN's filter shapes are scaled to the incumbent's multiply-adds;
  initialisation is compared with BatchNorm (the candidates) and without it (a contrast that cannot win).
- Winners by the evidence (`decide`): the best mean validation accuracy over seeds wins; a cheaper level within
  0.05 points (TIE) wins instead. A level with a diverged seed cannot win, nor can one with more than 1.1x the
  start config's multiply-adds (its final would not fit the 3- and 6-minute budgets). Each level's difference
  to the winner is paired by seed, with a 95% interval, and each stage states its detectable difference.
- Confirmed at full budget (`Study.confirm`): the chain of winners beside the start config (and for the MLP the
  single change with the largest grid gain), every final seed each (MLP 3, CNN 2); the best mean validation
  accuracy is kept. These final runs are the only ones that see the test set. Q3d beside them: the CNN chain
  with the other head training mode at full budget; a frozen run also records its linear head's accuracy.
- The CNN recipe's ablation (a regulariser removed in turn from START, grid budget) runs beside the tracks.

Engine: Dask distributed. `--workers N` starts a LocalCluster of N single-threaded worker processes; each
stage's runs (levels x seeds) are submitted together and the next stage starts when they are in; the tracks
run side by side. A worker returns the record and the model bytes; only this process writes results, each
file atomically, so an interrupted study resumes where it stopped, and a worker killed mid-run costs only
that run, which Dask retries.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

import cli
import mlp_scratch
import preprocessing
import study_results
from preprocessing import Splits, to_images
from study_results import T80, T975, StudyError, clean, mean


# ----------------------------------------------------------------------------------------- plans
@dataclasses.dataclass(frozen=True)
class Budget:
    """How much data and training a run gets; part of the run key."""
    subset: int | None = None      # training images (None = all 54k)
    n_eval: int | None = None      # validation (and, for finals, test) images (None = all)
    epochs: int | None = None      # None = the config's own epochs


@dataclasses.dataclass(frozen=True)
class Plan:
    """The budgets of one study. The defaults are the full study's (FULL_PLAN); --quick swaps in a tiny one."""
    name: str                # "full" | "quick"
    # The MLP grid keeps the final's 20 epochs on 10k images: at 6 epochs (20k images) no dropout won and
    # lost at full budget, because overfitting only shows over the final's epochs.
    mlp_grid: Budget = Budget(subset=10000)
    # The CNN grid: 10k images for 5 of the final's 10 epochs (1/11 of its image-epochs), 2 seeds.
    cnn_grid: Budget = Budget(subset=10000, epochs=5)
    mlp_final: Budget = Budget()
    cnn_final: Budget = Budget()
    mlp_seeds: tuple[int, ...] = (0, 1, 2)          # seeds of every MLP grid level
    cnn_seeds: tuple[int, ...] = (0, 1)             # seeds of every CNN grid and ablation level
    mlp_final_seeds: tuple[int, ...] = (0, 1, 2)
    cnn_final_seeds: tuple[int, ...] = (0, 1)
    confirm_single: tuple[str, ...] = ("mlp",)      # tracks whose largest single grid change is confirmed too
    init_images: int = 256                          # images behind the statistics at initialisation
    # A level with more than macs_cap times the start config's multiply-adds per image is trained and shown
    # but cannot win: the start configs' finals take about 2.6 min (MLP, one core) and 5.6 min (CNN, both
    # cores; results/cnn_default_timing.jsonl) here, against budgets of 3 and 6 minutes. Multiply-adds, not
    # measured seconds: they are exact, so the cap decides alike on every run and machine, where the grid's
    # seconds vary by 10% between levels that do the same arithmetic (random, Xavier and He initialisation).
    # The seconds stay in every table.
    macs_cap: float | None = 1.1
    overrides: dict = dataclasses.field(default_factory=dict)   # quick only: {"mlp": {...}, "cnn": {...}} on every run
    max_levels: int | None = None                   # quick only: levels per stage (the incumbent's kept)


FULL_PLAN = Plan("full")
QUICK_PLAN = Plan(
    "quick", mlp_grid=Budget(subset=1000, n_eval=500, epochs=1), cnn_grid=Budget(subset=300, n_eval=300, epochs=1),
    mlp_final=Budget(subset=2000, n_eval=1000, epochs=2), cnn_final=Budget(subset=600, n_eval=1000, epochs=1),
    mlp_seeds=(0, 1), mlp_final_seeds=(0, 1), init_images=32, max_levels=2,
    overrides={"mlp": {"hidden": [64, 64]},
               "cnn": {"filters": "4,4,8,8,16", "head_hidden": [32], "head_epochs": 2, "augment": False}})


# ----------------------------------------------------------------------------------------- the stages
@dataclasses.dataclass(frozen=True)
class Level:
    variant: str          # the level's label, e.g. "gelu"
    changes: dict         # config fields it sets
    eligible: bool = True  # False: a contrast shown beside the candidates that cannot win


@dataclasses.dataclass(frozen=True)
class Stage:
    id: str                                      # e.g. "mlp_activation"; its track is the prefix
    title: str                                   # e.g. "Activation function"
    factor: str                                  # axis label
    levels: Callable[[dict], list[Level]]        # incumbent config -> levels (the incumbent's included)
    beyond: Callable[[dict, int], Level | None] | None = None  # ordered: (incumbent, -1 | +1) -> next level
    model = property(lambda self: self.id.split("_")[0])  # its track: "mlp" | "cnn"


def _choices(field_name: str, values: Callable[[], tuple]) -> Callable[[dict], list[Level]]:
    """levels() of a factor whose values a module defines (read when the stage runs: cnn_torch imports torch)."""
    return lambda cfg: [Level(str(v), {field_name: v}) for v in values()]


def _ladder(ladder_of: Callable[[dict], list], get: Callable[[dict], object], changes: Callable[[object, dict], dict]):
    """levels() and beyond() of an ordered factor: the incumbent's value with its neighbours on a ladder of
    values; beyond(cfg, -1 | +1) is the next rung past that edge, two rungs from the incumbent's (None past the
    ladder's end, also where the incumbent's value is the edge)."""
    def rung(cfg, offset):  # the level `offset` rungs from the incumbent's value; None off the ladder
        ladder = sorted(set(ladder_of(cfg)) | {get(cfg)})
        j = ladder.index(get(cfg)) + offset
        return Level(f"{ladder[j]:g}", changes(ladder[j], cfg)) if 0 <= j < len(ladder) else None

    def levels(cfg):
        return [lv for offset in (-1, 0, 1) if (lv := rung(cfg, offset))]

    def beyond(cfg, direction):
        return rung(cfg, 2 * direction)
    return levels, beyond


def _width(cfg, key="hidden"):
    return cfg[key][0] if cfg[key] else 0


# Each optimizer at a learning rate that suits it; the learning-rate stage then scans around the winner's.
MLP_OPTIMIZERS = {"sgd": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
                  "adam": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
                  "adamw": {"optimizer": "adamw", "lr": 1e-3}}
FILTER_SHAPES = {"x1 x1 x2 x2 x4": (1, 1, 2, 2, 4), "constant": (1, 1, 1, 1, 1),
                 "doubling": (1, 2, 4, 8, 16), "halving": (16, 8, 4, 2, 1)}
# BatchNorm's removal is the init stage's contrast; weight decay and mirroring at test time are left in (four
# removals fit the budget; every run records its validation accuracy with and without the mirror).
ABLATION = {"full recipe": {}, "no augmentation": {"augment": False}, "no erasing": {"erase": 0.0},
            "no label smoothing": {"label_smoothing": 0.0}, "no weight averaging": {"ema": 0.0}}


def _cnn(name: str):
    import cnn_torch
    return getattr(cnn_torch, name)


def _mlp_optimizer_levels(cfg):
    return [Level(name, {"optimizer": name} if name == cfg["optimizer"] else changes)
            for name, changes in MLP_OPTIMIZERS.items()]


def _cnn_filter_levels(cfg):
    """Each shape scaled to the multiply-adds of the incumbent's filters (same kernel and pooling)."""
    target = cnn_macs(cfg)
    return [Level(name, {"filters": scale_filters(cfg, shape, target)}) for name, shape in FILTER_SHAPES.items()]


def _cnn_init_levels(cfg):  # with BatchNorm the candidates; without it, contrasts that cannot win
    return [Level(name if bn else f"{name}, no BN", {"init": name, "batchnorm": bn}, eligible=bn)
            for bn in (True, False) for name in _cnn("INITS")]


# Where each track's grid starts, stated whole: the MLP as the previous study kept it; the CNN with the short
# recipe of benchmarks/cnn_recipe_sweep.py (E10: 10 epochs at batch 256 and peak lr 4e-3, 10 head epochs).
# The module defaults (MLPConfig, CNNConfig) are the study's answer, so changing them moves no run here.
START = {
    "mlp": {"hidden": [1024, 1024], "activation": "relu", "dropout": 0.3, "init": "he", "optimizer": "adamw",
            "lr": 0.001, "momentum": 0.9, "weight_decay": 0.01, "schedule": "cosine", "warmup_epochs": 1.0,
            "epochs": 20, "batch_size": 256, "patience": 0, "standardize": True, "seed": 0, "subset": None},
    "cnn": {"filters": "32,32,64,64,128", "base_filters": 32, "kernel_size": 3, "pool": "max", "init": "xavier",
            "batchnorm": True, "head_mode": "frozen", "head_hidden": [256], "head_activation": "gelu",
            "head_dropout": 0.3, "head_epochs": 10, "optimizer": "adamw", "lr": 0.004, "head_lr": 0.001,
            "momentum": 0.9, "weight_decay": 0.05, "schedule": "onecycle", "epochs": 10, "batch_size": 256,
            "augment": True, "erase": 0.5, "label_smoothing": 0.1, "tta": True, "ema": 0.25, "patience": 0,
            "precision": "auto", "channels_last": True, "seed": 0, "subset": None, "device": "auto"}}

# The study's stages, in order: the one table that the driver, the tests, plots and the report read.
# The sigmoid is left out of the activations: it saturates like tanh at a quarter of its slope, so it cannot win
# where tanh does not; the statistics at initialisation (init_stats.csv) still show it beside the others.
STAGES = (
    Stage("mlp_activation", "Activation function", "activation",
          _choices("activation", lambda: [a for a in mlp_scratch.ACTIVATIONS if a != "sigmoid"])),
    Stage("mlp_depth", "Number of hidden layers", "hidden layers",
          *_ladder(lambda c: [0, 1, 2, 3, 4, 5], lambda c: len(c["hidden"]),
                   lambda d, c: {"hidden": [_width(c) or 1024] * d})),
    Stage("mlp_width", "Units per hidden layer", "units per hidden layer",
          # after a winning depth of 0 (no hidden layer) the widths are of one hidden layer, around 1024
          *_ladder(lambda c: [128, 256, 512, 768, 1024, 1536, 2048, 4096], lambda c: _width(c) or 1024,
                   lambda w, c: {"hidden": [w] * max(len(c["hidden"]), 1)})),
    Stage("mlp_dropout", "Dropout probability", "dropout probability",
          *_ladder(lambda c: [0.0, 0.1, 0.3, 0.5, 0.7], lambda c: c["dropout"], lambda p, c: {"dropout": p})),
    Stage("mlp_optimizer", "Optimiser", "optimizer", _mlp_optimizer_levels),
    Stage("mlp_lr", "Learning rate", "learning rate",
          *_ladder(lambda c: [float(f"{c['lr'] * 3.0 ** k:.3g}") for k in range(-3, 4)], lambda c: c["lr"],
                   lambda lr, c: {"lr": lr})),
    Stage("cnn_pool", "Pooling", "pooling", _choices("pool", lambda: _cnn("POOLS"))),
    Stage("cnn_kernel", "Kernel size", "kernel size",
          *_ladder(lambda c: _cnn("KERNELS"), lambda c: c["kernel_size"], lambda k, c: {"kernel_size": k})),
    Stage("cnn_filters", "Filters per layer", "filters per layer", _cnn_filter_levels),
    Stage("cnn_init", "Weight initialisation", "initialisation", _cnn_init_levels),
    # frozen first, as the committed study ran them
    Stage("cnn_head_mode", "Joint against frozen features", "head training",
          _choices("head_mode", lambda: sorted(_cnn("HEAD_MODES")))),
    Stage("cnn_head", "Width of the scratch MLP head", "head hidden units",
          *_ladder(lambda c: [64, 128, 256, 512, 1024], lambda c: _width(c, "head_hidden"),
                   lambda w, c: {"head_hidden": [w]})),
    Stage("cnn_ablation", "Recipe ablation", "recipe", lambda cfg: [Level(k, v) for k, v in ABLATION.items()]),
)
STAGE = {s.id: s for s in STAGES}
ABLATION_STAGE = STAGE["cnn_ablation"]
# The manifest's order: each track's stages (the CNN's ablation last), then its final.
STUDY_ORDER = [sid for m in study_results.MODELS for sid in [*(s.id for s in STAGES if s.model == m), f"{m}_final"]]


# ----------------------------------------------------------------------------------------- decisions
# Pure statistics: a stage's decision from its runs' validation accuracies. Computed here once and stored in
# manifest.json; the tables, plots and report read it from there.
TIE = 0.0005  # levels within 0.05 points of the best mean are tied; of tied levels the cheaper wins


def decide(by_variant: dict[str, list[dict]], cost: dict[str, float], eligible: set[str], incumbent: str) -> dict:
    """A stage's decision from its levels' runs ({variant: records}), each level's cost (multiply-adds) and
    the levels that may win (within the compute budget, no diverged seed).

    The winner has the best mean validation accuracy, except that a cheaper level within TIE of it wins
    instead (an exact tie of cost and mean: the incumbent). Every level is then compared with the winner,
    paired by seed (a seed fixes the initial weights' draw, the data subset and its order): the mean of its
    per-seed differences d_s, with the 95% interval mean +- t(.975, dof) s / sqrt(n), where s is the standard
    deviation of the differences pooled over the levels that may win (dof: the sum of their n - 1). `mdd`, the
    smallest true difference the stage detects with 80% power at the 5% level, is
    (t(.975, dof) + t(.80, dof)) s / sqrt(n). With one seed there is no s: no interval, no mdd."""
    accs = {v: {r["seed"]: r["val_acc"] for r in recs} for v, recs in by_variant.items() if recs}
    means = {v: float(np.mean(list(a.values()))) for v, a in accs.items() if None not in a.values()}
    ok = [v for v in means if v in eligible and not any(r["diverged"] for r in by_variant[v])]
    best = max(ok, key=lambda v: means[v], default=None)
    if best is None:
        return {"winner": None, "rows": {}, "sd": None, "dof": 0, "mdd": None}
    tied = [v for v in ok if means[v] >= means[best] - TIE]
    winner = min(tied, key=lambda v: (cost[v], -means[v], v != incumbent))
    diffs = {v: [a[s] - accs[winner][s] for s in a if s in accs[winner]] for v, a in accs.items()
             if v != winner and v in means}
    pooled = [d for v, d in diffs.items() if v in ok]
    dof = sum(len(d) - 1 for d in pooled)
    sd = math.sqrt(sum(((np.array(d) - np.mean(d)) ** 2).sum() for d in pooled) / dof) if dof else None
    t = (T975.get(dof, 1.960), T80.get(dof, 0.842))
    rows = {v: {"mean": means.get(v), "diff": float(np.mean(diffs[v])) if v in diffs else 0.0 if v == winner else None,
                "ci": None if sd is None or v not in diffs else
                [float(np.mean(diffs[v])) + k * t[0] * sd / math.sqrt(len(diffs[v])) for k in (-1, 1)],
                "n": len(accs[v]), "eligible": v in ok} for v in accs}
    return {"winner": winner, "rows": rows, "sd": sd, "dof": dof,
            "mdd": None if sd is None else (t[0] + t[1]) * sd / math.sqrt(len(accs[winner]))}


# ----------------------------------------------------------------------------------------- the study
class Study:
    """The procedure. Each track (run_track) runs its stages in order, each stage around the winner of the one
    before (run_stage: its levels x seeds trained together, `decide`, one level more past a winning edge), then
    confirms at full budget (confirm): the chain of winners beside the start configuration (and, where the
    plan asks, the single change with the largest grid gain), paired by seed; the better on mean validation
    accuracy is kept. The CNN recipe's ablation runs beside the tracks. What each stage decided is stored once,
    in self.stages, and written to manifest.json. The engine trains (run: submit and wait)."""

    def __init__(self, engine: Engine, plan: Plan, *, only: str | None = None, final_seeds=None):
        self.engine, self.plan = engine, plan
        self.tracks = [m for m in study_results.MODELS if only in (None, m)]
        self.start = {m: start_config(m, plan) for m in study_results.MODELS}  # each track's start config
        self.final_seeds = {"mlp": plan.mlp_final_seeds, "cnn": tuple(final_seeds or plan.cnn_final_seeds)}
        self.runs: list[dict] = []            # manifest rows
        self.stages: dict[str, dict] = {}     # manifest stages: levels and decision
        self.finals: dict[str, dict] = {}     # manifest finals: the candidates, the one kept, the heads (Q3d)
        self.reference: dict[str, list[dict]] = {}  # the start config's grid runs: the time ratios' yardstick
        self.cnn_submitted = threading.Event()      # the CNN track has submitted its first runs

    def run(self) -> None:
        jobs = [lambda m=m: self.run_track(m) for m in self.tracks]
        if "cnn" in self.tracks:  # once the CNN track's first stage is submitted: the runs of the start config
            # are the ablation's "full recipe" too, and a run shared by two stages is labelled by the first to
            # submit it, so that it is labelled in plan order
            jobs.append(lambda: self.cnn_submitted.wait() and self.run_stage(ABLATION_STAGE, self.start["cnn"]))
        _run_threads(jobs)

    def run_track(self, model: str) -> None:
        start = cfg = self.start[model]
        for stage in [s for s in STAGES if s.model == model and s is not ABLATION_STAGE]:
            cfg = self.run_stage(stage, cfg)
        candidates = {"chain": cfg, "start": start}
        if model in self.plan.confirm_single:  # the stage change with the largest grid gain, on its own
            gains = {sid: st["gain"] for sid, st in self.stages.items() if sid.startswith(model) and st["gain"]}
            if gains:
                candidates["largest single change"] = apply(start, self.stages[max(gains, key=gains.get)]["changes"])
        self.confirm(model, candidates)

    def run_stage(self, stage: Stage, cfg: dict) -> dict:
        """One stage around the incumbent `cfg`; stores its decision and returns the winner's config."""
        levels = stage.levels(cfg)
        own = next((lv.variant for lv in levels if lv.changes.items() <= cfg.items()), "incumbent")  # cfg's level
        if own == "incumbent":  # e.g. filters that no scaled shape reproduces
            levels = [Level(own, {}), *levels]
        if self.plan.max_levels:  # --quick: the first few, the incumbent's kept
            levels = [lv for i, lv in enumerate(levels) if i < self.plan.max_levels or lv.variant == own]
        by_variant = self.run_levels(stage, levels, cfg)
        if cfg == self.start[stage.model]:
            self.reference.setdefault(stage.model, by_variant[own])
        decision, macs, capped = self.decide_stage(stage, levels, by_variant, own)
        # A challenger that won at an end of an ordered factor's levels gets one more level past it (not in
        # --quick, whose levels are cut short).
        winner = decision["winner"]
        side = -1 if winner == levels[0].variant else 1 if winner == levels[-1].variant else 0
        extend = stage.beyond and side and winner != own and not self.plan.max_levels
        extra = stage.beyond(cfg, side) if extend else None
        if extended := extra is not None and extra.variant not in by_variant:
            levels = [extra, *levels] if side < 0 else [*levels, extra]
            by_variant.update(self.run_levels(stage, [extra], cfg))
            decision, macs, capped = self.decide_stage(stage, levels, by_variant, own)
        winner = decision["winner"] or own  # no level usable (all diverged): the incumbent stays
        changes = next(lv.changes for lv in levels if lv.variant == winner)
        rows = decision["rows"]
        self.stages[stage.id] = {
            "model": stage.model, "factor": stage.factor, "ordered": stage.beyond is not None, "incumbent": own,
            **decision, "winner": winner, "changes": changes,
            "gain": rows[winner]["mean"] - rows[own]["mean"] if rows.get(own, {}).get("mean") is not None else 0.0,
            "levels": [lv.variant for lv in levels], "extended": extended,
            "contrast": [lv.variant for lv in levels if not lv.eligible or lv.variant in capped],
            "macs_capped": [lv.variant for lv in levels if lv.variant in capped],
            "macs_ratio": {v: round(r, 3) for v, r in macs.items()},
            "time_ratio": self.time_ratios(stage.model, by_variant),
            "edge": stage.beyond is not None and winner in (levels[0].variant, levels[-1].variant)}
        return apply(cfg, changes)

    def run_levels(self, stage: Stage, levels: list[Level], cfg: dict) -> dict[str, list[dict]]:
        """Every level x seed at once; each level's records."""
        seeds = self.plan.mlp_seeds if stage.model == "mlp" else self.plan.cnn_seeds
        grid = self.plan.mlp_grid if stage.model == "mlp" else self.plan.cnn_grid
        role = "ablation" if stage is ABLATION_STAGE else "grid"
        specs = [make_spec(stage.model, stage.id, lv.variant, seed, apply(cfg, lv.changes), grid, role, self.plan)
                 for lv in levels for seed in seeds]
        records = self.train(specs)
        return {lv.variant: [r for s, r in zip(specs, records) if s.variant == lv.variant] for lv in levels}

    def decide_stage(self, stage: Stage, levels: list[Level], by_variant: dict, own: str):
        """(`decide`'s decision, each level's multiply-adds over the start config's, the levels over the cap)."""
        macs_of, start = mlp_macs if stage.model == "mlp" else cnn_macs, self.start[stage.model]
        macs = {lv.variant: macs_of(apply(start, lv.changes)) for lv in levels}
        ratio = {v: m / macs_of(start) for v, m in macs.items()}
        capped = {v for v, r in ratio.items() if self.plan.macs_cap and r > self.plan.macs_cap}
        eligible = {lv.variant for lv in levels if lv.eligible and lv.variant not in capped}
        return decide(by_variant, macs, eligible, own), ratio, capped

    def time_ratios(self, model: str, by_variant: dict[str, list[dict]]) -> dict[str, float]:
        """Each level's mean wall seconds over the start config's grid runs' (levels without times: left out)."""
        ref = mean([r.get("seconds") for r in self.reference.get(model, [])])
        means = {v: mean([r.get("seconds") for r in recs]) for v, recs in by_variant.items()}
        return {v: round(m / ref, 3) for v, m in means.items() if m and ref}

    def confirm(self, model: str, candidates: dict[str, dict]) -> None:
        """Every candidate (a config; one that equals an earlier candidate is that candidate) at full budget with
        the final seeds, all at once; the best mean validation accuracy is kept (a tie: the first named). These
        are the final runs, the only ones that see the test set. For the CNN, Q3d beside them: the chain with
        the other way of training the head, at the same budget (no test set)."""
        same = {name: next(n for n, c in candidates.items() if c == cfg) for name, cfg in candidates.items()}
        specs = {name: self.final_specs(model, name, cfg, "final")
                 for name, cfg in candidates.items() if same[name] == name}
        chain, heads = candidates["chain"], []
        if model == "cnn":
            other = next(m for m in _cnn("HEAD_MODES") if m != chain["head_mode"])
            heads = self.final_specs(model, f"{other} head", apply(chain, {"head_mode": other}), "heads")
        by_key = {r["key"]: r for r in self.train([s for group in specs.values() for s in group] + heads)}
        val = {name: float(np.mean([_val(by_key[s.key]) for s in group])) for name, group in specs.items()}
        kept = max(specs, key=lambda name: val[name])
        keys = {name: [s.key for s in group] for name, group in specs.items()}
        self.finals[model] = {"candidates": keys, "same": same, "kept": kept, "seeds": keys[kept]}
        if heads:
            self.finals[model]["heads"] = {chain["head_mode"]: keys["chain"], other: [s.key for s in heads]}

    def train(self, specs: list[RunSpec]) -> list[dict]:
        self.engine.start(specs)
        if specs[0].model == "cnn":
            self.cnn_submitted.set()
        records = self.engine.run(specs)
        self.runs += [{k: getattr(s, k) for k in study_results.RUN_ROW} for s in specs]  # the manifest's rows
        return records

    def final_specs(self, model: str, name: str, cfg: dict, role: str) -> list[RunSpec]:
        budget = self.plan.mlp_final if model == "mlp" else self.plan.cnn_final
        return [make_spec(model, f"{model}_final", name, seed, cfg, budget, role, self.plan)
                for seed in self.final_seeds[model]]

    def manifest(self) -> dict:
        """Runs and stages in the plan's order, not in the order the tracks' threads got to them: the same study
        writes the same manifest."""
        return {"plan": self.plan.name, "seeds": {"mlp": list(self.plan.mlp_seeds), "cnn": list(self.plan.cnn_seeds)},
                "macs_cap": self.plan.macs_cap, "tie": TIE, "start": {m: self.start[m] for m in self.tracks},
                "runs": sorted(self.runs, key=lambda row: STUDY_ORDER.index(row["study"])),
                "stages": dict(sorted(self.stages.items(), key=lambda item: STUDY_ORDER.index(item[0]))),
                "finals": {m: self.finals[m] for m in study_results.MODELS if m in self.finals}}


# ----------------------------------------------------------------------------------------- configs
def config_class(model: str):
    return mlp_scratch.MLPConfig if model == "mlp" else _cnn("CNNConfig")


def apply(cfg: dict, changes: dict) -> dict:
    """cfg with changes, as JSON holds it (tuples become lists)."""
    return json.loads(json.dumps({**cfg, **changes}))


def cnn_macs(cfg: dict) -> int:
    """Multiply-adds of one image through the five convolutions and the head's layers."""
    import cnn_torch
    backbone = cnn_torch.build_backbone(cnn_torch.CNNConfig(**{**cfg, "device": "cpu"}))
    return int(backbone.conv_macs()) + mlp_macs({"hidden": cfg["head_hidden"]}, backbone.feature_dim)


def mlp_macs(cfg: dict, inputs: int = preprocessing.INPUT_DIM) -> int:
    """Multiply-adds of one input through the MLP's layers (the CNN's head: `inputs` features)."""
    dims = [inputs, *cfg["hidden"], preprocessing.NUM_CLASSES]
    return sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def scale_filters(cfg: dict, shape: tuple[int, ...], target_macs: int) -> str:
    """The filter counts in the proportions of `shape`, each a multiple of 8, whose multiply-adds come closest
    to target_macs without passing the cap on them (FULL_PLAN.macs_cap times target_macs). Multiples of 8,
    because oneDNN's convolutions work on blocks of channels: a training step of 44,44,44,44,44 filters took
    201 ms, one of 48,48,48,48,48 (19% more multiply-adds) 167 ms, and 16,24,48,96,192 took 132 ms against
    188 ms for 12,25,50,100,200 (bf16, 2 cores, batch 256)."""
    def counts(narrowest: float) -> str:
        return ",".join(str(max(8, 8 * round(narrowest * s / min(shape) / 8))) for s in shape)

    def gap(narrowest: float) -> float:
        macs = cnn_macs({**cfg, "filters": counts(narrowest)})
        return abs(macs - target_macs) if macs <= FULL_PLAN.macs_cap * target_macs else math.inf
    # Multiply-adds grow about quadratically with the width: start from that guess, then look nearby in
    # quarter steps of the narrowest layer (whole steps are too coarse when it has only a few filters).
    guess = round(8 * math.sqrt(target_macs / cnn_macs({**cfg, "filters": counts(8)})))
    return counts(min((n / 4 for n in range(max(4 * guess - 12, 4), 4 * guess + 13)), key=gap))


# ----------------------------------------------------------------------------------------- runs
@dataclasses.dataclass(frozen=True)
class RunSpec:
    model: str
    study: str
    variant: str
    seed: int
    config: dict        # the module config, seed and budget applied
    budget: Budget
    role: str           # "grid" | "ablation" | "final" | "heads" (Q3d at full budget, no test set)
    plan: str           # "full" | "quick"

    @property
    def key(self) -> str:
        """Short hash of everything that decides the run's numbers (not the device, threads or labels)."""
        cfg = {k: v for k, v in self.config.items() if k != "device"}
        blob = json.dumps({"model": self.model, "config": cfg, "budget": dataclasses.asdict(self.budget),
                           "final": self.role == "final"}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def start_config(model: str, plan: Plan) -> dict:
    """Where a track's grid, its ablation and its "start" final begin: START, whole (not the module defaults,
    which are the study's answer)."""
    return apply(START[model], plan.overrides.get(model, {}))


def make_spec(model, study, variant, seed, base: dict, budget: Budget, role: str, plan: Plan) -> RunSpec:
    cfg = apply(base, {"seed": seed, "subset": budget.subset,
                       "epochs": base["epochs"] if budget.epochs is None else budget.epochs})  # None: the config's own
    if model == "cnn":
        cfg["device"] = "cpu"  # the run's device is the engine's choice (run_on_worker), not part of the run
    config = config_class(model)(**cfg)
    try:
        config.validate()
    except ValueError as e:  # a bad level or budget is a bug in the plan, never a diverged run
        raise StudyError(f"{study} / {variant}: {e}") from None
    return RunSpec(model, study, variant, seed, apply(config.to_dict(), {}), budget, role, plan.name)


# ----------------------------------------------------------------------------------------- worker side
def run_on_worker(spec: RunSpec, splits: Splits, threads: int, device: str) -> tuple[dict, dict]:
    """Train and evaluate one run in a worker process: (record, model files as {relative path: bytes}).
    A divergence is a record; any other error propagates (it is a bug or a fault of the environment)."""
    from threadpoolctl import threadpool_limits
    import torch
    torch.set_num_threads(threads)
    data = splits.subset(spec.budget.subset, spec.budget.n_eval, seed=spec.seed)  # None: the whole split
    t0, files = time.perf_counter(), {}
    with threadpool_limits(limits=threads):
        res, out, save = (_train_mlp if spec.model == "mlp" else _train_cnn)(spec, data, device)
        if spec.role == "final":
            out["model_file"], files = _model_files(spec, save)
    best = next((h for h in res.history if h.get("epoch") == res.best_epoch), {})
    record = {
        "key": spec.key, "model": spec.model, "study": spec.study, "variant": spec.variant, "seed": spec.seed,
        "role": spec.role, "final": spec.role == "final", "plan": spec.plan, "config": spec.config,
        "budget": dataclasses.asdict(spec.budget), "n_train": len(data.y_train), "n_val": len(data.y_val),
        "epochs_run": res.epochs_run, "best_epoch": res.best_epoch, "train_loss": best.get("train_loss"),
        "train_acc": best.get("train_acc"), "seconds": time.perf_counter() - t0, "threads": threads,
        "device": str(getattr(res, "device", "cpu")), "sec_per_epoch": mean([h.get("seconds") for h in res.history]),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "history": res.history, "diverged": bool(res.diverged), **out}
    return clean(record), files


def _train_mlp(spec: RunSpec, data: Splits, device: str):
    """(the training result, what the run records beyond the fields every run has, its model's save function)."""
    res = mlp_scratch.train(mlp_scratch.MLPConfig(**spec.config), data.X_train, data.y_train,
                            data.X_val, data.y_val, progress=False, input_range=mlp_scratch.PIXEL_RANGE)
    out = {"n_params": int(res.model.n_params), "macs": mlp_macs(spec.config),
           "layer_stats": mlp_scratch.layer_statistics(res.model, data.X_val[:1000], data.y_val[:1000]),
           **_evaluate(spec, data, lambda X, y: mlp_scratch.evaluate(res.model, X, y),
                       lambda X: mlp_scratch.softmax(res.model.forward(X)))}
    return res, out, res.model.save


def _train_cnn(spec: RunSpec, data: Splits, device: str):
    import cnn_torch
    res = cnn_torch.train(cnn_torch.CNNConfig(**{**spec.config, "device": device}), data, progress=False)
    clf = res.classifier
    backbone = [h for h in res.history if h["phase"] == "backbone"]  # frozen mode: trained with a linear head
    out = {"precision": res.precision, "n_params": int(res.n_params), "feature_dim": clf.backbone.feature_dim,
           "macs": cnn_macs(spec.config), "layer_stats": None,
           "linear_val_acc": max((v for h in backbone if math.isfinite(v := h["val_acc"])), default=None),  # Q3d
           "backbone_seconds": sum(h["seconds"] for h in backbone) if backbone else None,
           "val_acc_unmirrored": cnn_torch.evaluate_classifier(  # what mirroring at test time adds
               cnn_torch.CNNClassifier(clf.backbone, clf.head, dataclasses.replace(clf.config, tta=False)),
               to_images(data.X_val), data.y_val)["acc"],
           **_evaluate(spec, data, lambda X, y: cnn_torch.evaluate_classifier(clf, to_images(X), y),
                       lambda X: clf.predict_proba(to_images(X)))}
    return res, out, clf.save


def _evaluate(spec, data, evaluate, predict_proba) -> dict:
    """Validation always; the test set only for final runs, with predictions for the paired tests."""
    val = evaluate(data.X_val, data.y_val)
    out = {"val_loss": val["loss"], "val_acc": val["acc"]}
    if spec.role == "final":  # the paired tests compare predictions image by image
        test, prob = evaluate(data.X_test, data.y_test), predict_proba(data.X_test)
        pred = prob.argmax(axis=1)
        out.update({"n_test": len(data.y_test), "test_loss": test["loss"], "test_acc": test["acc"],
                    "test_true": data.y_test.tolist(), "test_pred": pred.tolist(),
                    "test_prob_max": np.round(prob.max(axis=1), 5).tolist(),
                    **study_results.classification_report(data.y_test, pred)})
    return out


def _model_files(spec: RunSpec, save: Callable[[str], Path]) -> tuple[str, dict]:
    """A final run's saved model: its path under the results folder (the MLP's file, the CNN's folder) and its
    files' bytes by path there (the driver writes them)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = save(str(Path(tmp) / f"{spec.model}_{spec.key}"))  # the path written: the MLP's gets .npz
        rel = f"models/runs/{path.name}"
        paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return rel, {str(Path(rel, p.relative_to(path))): p.read_bytes() for p in paths}


# ----------------------------------------------------------------------------------------- engine
class Engine:
    """Runs RunSpecs on a Dask cluster and writes each finished run through the registry (driver only)."""

    def __init__(self, client, splits: Splits, registry, *, device: str, threads: int = 1, log=None,
                 runner: Callable = run_on_worker):  # runner: what a worker calls with (spec, splits, threads, device)
        self.client, self.registry, self.device, self.threads, self.runner = client, registry, device, threads, runner
        self.log = log or (lambda msg: print(msg, flush=True))  # one line per run, at once, in a log file
        self.splits = client.scatter(splits, broadcast=True)  # once per worker, not once per run
        self.lock = threading.Lock()
        self.in_flight: dict[str, object] = {}  # run key -> its future, submitted and not yet written
        self.submitted, self.executed = 0, []  # submissions so far (each its own Dask key); run keys trained here
        from tqdm import tqdm
        self.bar = tqdm(total=0, unit="run", desc="study", disable=not sys.stderr.isatty(), dynamic_ncols=True)

    def start(self, specs: list[RunSpec]) -> list:
        """Submit the specs neither done nor in flight, without waiting; returns the futures of the specs not
        done yet. A run in flight is never submitted twice: a later call for it waits on the same future."""
        with self.lock:
            for s in specs:
                if s.key not in self.registry and s.key not in self.in_flight:
                    # A Dask key of its own per submission: a run cancelled and asked for again is a new task.
                    self.submitted += 1
                    self.in_flight[s.key] = self.client.submit(
                        self.runner, s, self.splits, self.threads, self.device,
                        key=f"run-{s.key}-{s.plan}-{self.submitted}", pure=False, retries=1)
                    self.bar.total += 1
            self.bar.refresh()
            return list({s.key: self.in_flight[s.key] for s in specs if s.key in self.in_flight}.values())

    def run(self, specs: list[RunSpec]) -> list[dict]:
        """Every spec's record, training those not yet done (all at once; this call waits for them)."""
        from distributed import KilledWorker, as_completed
        for future in as_completed(self.start(specs)):
            try:
                record, files = future.result()
            except KilledWorker as e:  # every worker that ran it died: out of memory, most likely
                spec = next(s for s in specs if self.in_flight.get(s.key) is future)
                raise StudyError(f"{spec.study} {spec.variant} seed {spec.seed} (run {spec.key}) killed the "
                                 f"worker running it {e.allowed_failures + 1} times (out of memory?); finished runs "
                                 f"are kept, run the same command again to resume") from None
            with self.lock:
                self.in_flight.pop(record["key"], None)
                if record["key"] not in self.registry:  # else collected first by another call waiting on this run
                    self.registry.add(record, files)
                    self.executed.append(record["key"])
                    self.bar.update(1)
                    (self.log if self.bar.disable else self.bar.write)(_run_line(record))
        return [self.registry.records[s.key] for s in specs]


def _run_line(rec: dict) -> str:
    acc = "   nan" if rec.get("val_acc") is None else f"{rec['val_acc']:.4f}"
    test = f"  test {rec['test_acc']:.4f}" if rec.get("test_acc") is not None else ""
    return (f"{rec['study']:<15} {rec['variant']:<20} seed {rec['seed']}  val {acc}{test}  "
            f"{rec['seconds']:6.1f}s  {rec['key']}{'  DIVERGED' if rec['diverged'] else ''}")


def _connect(scheduler: str, client_class=None, seconds: float = 30.0):
    """A client of the scheduler at `scheduler` (--scheduler). Anything that is not a Dask scheduler answering
    within `seconds` (a bad address, a closed port, another server on that port, which can leave the handshake
    waiting forever) is a StudyError."""
    from distributed import Client
    result = {"error": f"no Dask handshake within {seconds:.0f} s (is it a Dask scheduler?)"}

    def connect():
        try:
            result["client"] = (client_class or Client)(scheduler, timeout="20s")
        except Exception as e:  # noqa: BLE001 -- whatever went wrong, it is not a scheduler we can use
            result["error"] = f"{e.__class__.__name__}: {e}"
    thread = threading.Thread(target=connect, daemon=True)  # a stuck handshake dies with the process
    thread.start()
    thread.join(seconds)
    if "client" not in result:
        raise StudyError(f"cannot reach the Dask scheduler at {scheduler}: {result['error'].splitlines()[0]}")
    return result["client"]


def start_client(workers: int):
    """A client of a new local cluster of `workers` single-threaded worker processes, and the cluster."""
    import dask
    from distributed import Client, LocalCluster
    # The workers ignore Ctrl-C (inherited across exec): the driver alone handles it and shuts them down.
    # Logs below CRITICAL stay quiet, here and in the workers: a run's own error reaches the driver through its
    # future, and what Dask logs at ERROR is a result cut off in transfer when Ctrl-C closes the client.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # Dask starts its workers with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's adaptive mmap
        # threshold: every batch-sized array is then mmapped and unmapped afresh, and a training run took 1.5x as
        # long (MLP and CNN alike). None unsets it (workers of an existing cluster: set DASK_DISTRIBUTED__NANNY__
        # PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_=None where `dask worker` starts).
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, memory_limit=0, silence_logs=logging.CRITICAL,
                                   scheduler_kwargs={"dashboard_address": ":0"})  # its HTTP routes: any free port
    finally:
        signal.signal(signal.SIGINT, previous)
    return Client(cluster), cluster


@contextlib.contextmanager
def ctrl_c_held():
    """Holds a Ctrl-C pressed inside the block until the block is done, then acts on it as it would have."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed and callable(previous):  # Python's own handler raises KeyboardInterrupt; SIG_IGN stays ignored
        previous(signal.SIGINT, pressed[0])


def _val(rec: dict) -> float:
    return -math.inf if rec["diverged"] or rec["val_acc"] is None else rec["val_acc"]


def _run_threads(jobs: list[Callable[[], None]]) -> None:
    """Run the jobs side by side; the first error (or Ctrl-C) stops the study."""
    errors: list[BaseException] = []

    def wrap(job):
        try:
            job()
        except BaseException as e:  # re-raised in the main thread below
            errors.append(e)
    threads = [threading.Thread(target=wrap, args=(j,), daemon=True) for j in jobs]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) and not errors:
        time.sleep(0.2)
    if errors:
        raise errors[0]


# ----------------------------------------------------------------------------------------- init statistics
INIT_STATS_COLUMNS = ["model", "scheme", "batchnorm", "layer", "act_mean", "act_std", "dead_frac", "grad_norm"]


def compute_init_stats(splits: Splits, n_images: int) -> list[dict]:
    """Per-layer statistics at initialisation of the default networks: the MLP per init (ReLU) and per
    activation, four hidden layers deep so trends show; the CNN per init, with BatchNorm and without."""
    import cnn_torch
    X, y = splits.X_train[:n_images], splits.y_train[:n_images]
    mlp, rows = START["mlp"], []
    for label, init, act in [*((init, init, mlp["activation"]) for init in mlp_scratch.INITS),
                             *((act, mlp["init"], act) for act in mlp_scratch.ACTIVATIONS)]:
        model = mlp_scratch.MLP(preprocessing.INPUT_DIM, [_width(mlp)] * 4, preprocessing.NUM_CLASSES,
                                activation=act, dropout=0.0, init=init, seed=0)
        model.input_mean, model.input_std = preprocessing.standardization_stats(splits.X_train)
        rows += [{"model": "mlp", "scheme": label, "batchnorm": False, **r}
                 for r in mlp_scratch.layer_statistics(model, X, y)]
    for batchnorm in (True, False):
        for scheme in cnn_torch.INITS:
            cfg = cnn_torch.CNNConfig(**{**START["cnn"], "init": scheme, "batchnorm": batchnorm, "device": "cpu"})
            rows += [{"model": "cnn", "scheme": scheme, "batchnorm": batchnorm, **r}
                     for r in cnn_torch.init_statistics(cfg, to_images(X), y)]
    return clean(rows)  # write_csv keeps INIT_STATS_COLUMNS


# ----------------------------------------------------------------------------------------- driver
def write_manifest(results_dir: Path, manifest: dict, tracks: list[str]) -> None:
    """manifest.json: which runs make up each comparison, each stage's levels and decision, the finals. The
    rows of a track not run now (--only) are kept from the previous manifest (its readable parts)."""
    old = study_results.load_manifest(results_dir, log=lambda *a: None)
    manifest = {**manifest, "runs": [r for r in old["runs"] if r["model"] not in tracks] + manifest["runs"],
                "stages": {**{k: v for k, v in old["stages"].items() if v.get("model") not in tracks},
                           **manifest["stages"]},
                "finals": {**{k: v for k, v in old["finals"].items() if k not in tracks}, **manifest["finals"]}}
    cli.atomic_write(Path(results_dir) / "manifest.json", json.dumps(manifest, indent=1))


def run_study(args: argparse.Namespace, *, splits: Splits | None = None, plan: Plan | None = None, log=print,
              plots: bool = True) -> Study:
    """Train every run not yet in <results>/runs, then rebuild every output from the saved runs. `args`: what
    parse_args gives; `plan` (tests): instead of the one --quick picks."""
    t0 = time.perf_counter()
    plan = plan or (QUICK_PLAN if args.quick else FULL_PLAN)
    plan = dataclasses.replace(plan, mlp_seeds=args.seeds, cnn_seeds=args.seeds) if args.seeds else plan
    results_dir = Path(args.results_dir)
    device = _check_device(args.device)
    with study_results.results_lock(results_dir):
        registry = study_results.Registry(results_dir, log=log)
        # before the data and the statistics: a scheduler that does not answer costs 20 s
        client = _connect(args.scheduler) if args.scheduler else None
        cluster = engine = None
        try:
            splits = splits if splits is not None else preprocessing.load_splits(args.data_dir)
            # Before a local cluster starts: starting it sets OMP_NUM_THREADS=1 in this process, which changes
            # torch's summation order and so the statistics' last digits. They depend on the code and data only.
            if not (results_dir / "init_stats.csv").exists():
                study_results.write_csv(results_dir / "init_stats.csv", INIT_STATS_COLUMNS,
                                        compute_init_stats(splits, plan.init_images))
            if client is None:
                client, cluster = start_client(args.workers)
            engine = Engine(client, splits, registry, device=device, threads=args.threads,
                            log=None if log is print else log)
            study = Study(engine, plan, only=args.only, final_seeds=args.final_seeds)
            study.executed = engine.executed
            try:
                study.run()
            finally:
                write_manifest(results_dir, study.manifest(), study.tracks)
        finally:
            with ctrl_c_held():  # a cluster closed halfway leaves the exit waiting 10 s on it
                for closing in [c for c in (engine and engine.bar, client, cluster) if c is not None]:
                    closing.close()
        wall = time.perf_counter() - t0
        # A resume that trained nothing keeps the wall time of the invocation that did.
        outputs = study_results.rebuild_outputs(results_dir, log=log, wall_seconds=wall if engine.executed else None,
                                                workers=args.scheduler or args.workers)
        if plots:
            import plots as figures  # here, not at the top: matplotlib's import is only paid where figures are drawn
            figures.make_figures(results_dir, outputs[0], outputs[2], splits)
    log(f"Study done in {wall / 60:.1f} min: {len(engine.executed)} runs trained; results in {results_dir}")
    return study


def rebuild_only(args: argparse.Namespace) -> None:
    """--plots-only: every output from the saved runs, no training; refused where there is nothing to
    rebuild from (nothing is created there)."""
    rd = Path(args.results_dir)
    if not (rd / "manifest.json").is_file() and not any((rd / "runs").glob("*.json")):
        raise StudyError(f"{rd} holds no study results (no manifest.json, no runs/*.json): run the study first")
    with study_results.results_lock(rd):
        rows, _, summary = study_results.rebuild_outputs(rd)  # refused before the data is read
        import plots
        plots.make_figures(rd, rows, summary, preprocessing.load_splits(args.data_dir))
    print(f"Rebuilt tables, summary.json and figures in {rd}")


def _check_device(name: str) -> str:
    try:
        return name if name == "cpu" else str(_cnn("resolve_device")(name))  # cpu: no torch imported here
    except (ValueError, RuntimeError) as e:
        raise StudyError(f"--device {name}: {e}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the whole pipeline on a small subset (default: off)")
    p.add_argument("--compare", nargs=2, type=cli.path_arg, metavar=("NEW", "OLD"),
                   help="compare every run record of results folder OLD with NEW's (make reproduce) and exit")
    p.add_argument("--plots-only", action="store_true",
                   help="rebuild CSVs, summary.json and figures from <results-dir>/runs without training")
    p.add_argument("--results-dir", type=cli.path_arg, default="results", help="output folder (default: results)")
    p.add_argument("--seeds", type=cli.seed_list_arg, help="seeds of every grid level (default: MLP 0,1,2 and CNN 0,1)")
    p.add_argument("--final-seeds", type=cli.seed_list_arg, default=None,
                   help="seeds of each CNN final candidate (default: 0,1; 0,1,2 is affordable on a GPU)")
    p.add_argument("--only", choices=study_results.MODELS, default=None, help="one track only (default: both)")
    p.add_argument("--workers", type=cli.count_arg("workers", 256), default=2, help="local single-threaded worker "
                   "processes (default: 2, fastest on 2 cores: benchmarks/bench_workers.py)")
    p.add_argument("--threads", type=cli.count_arg("threads", 1024), default=1,
                   help="BLAS and torch threads of each run, e.g. --workers 4 --threads 4 on 16 cores (default: 1)")
    p.add_argument("--scheduler", type=cli.path_arg, default=None,
                   help="address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: local)")
    p.add_argument("--device", default="cpu", help="CNN device: cpu, cuda, cuda:N, mps, auto (default: cpu)")
    p.add_argument("--data-dir", type=cli.path_arg, help="Fashion-MNIST folder (default: preprocessing's search)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare:
        import pandas as pd
        rows, line = study_results.compare_studies(*args.compare)
        # to_string prints every row and column, whatever pandas' display options say
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{100 * v:+.2f}"))
        print(f"reproduce: {line}")
    elif args.plots_only:
        rebuild_only(args)
    elif why := cli.cannot_write(args.results_dir, folder=True):
        raise StudyError(why)
    else:
        run_study(args)
    return 0


if __name__ == "__main__":
    # Workers unpickle the run function by its module name, so the driver runs as `run_experiments`, not __main__.
    import run_experiments
    sys.exit(cli.run(run_experiments.main, "run_experiments.py",
                     on_interrupt="finished runs are saved; run the same command again to resume"))
