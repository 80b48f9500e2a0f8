"""Does the study's grid budget rank a stage's settings as the full budget does? The evidence behind the grid
budgets of run_experiments.FULL_PLAN (MLP: 10,000 images x 20 epochs; CNN: 10,000 images x 5 epochs).

    python benchmarks/grid_budget.py              # after the study: about 35 minutes on the 2-core course CPU
    python benchmarks/grid_budget.py --only cnn   # one model's stages

For three stages of each model (FACTORS), the setting the stage started from and the stage's winner (its
runner-up where the starting setting won) are trained at the full budget with seeds 0 and 1 and compared with
their grid-budget runs: validation accuracy only, the test set is not read. Every run with the same
configuration and budget that the study already trained (the stages' own runs, the confirmation's and Q3d's
full-budget runs) is read from results/runs instead of trained again. The rows go to results/grid_budget.json.
A stage passes when its grid winner is the full budget's winner, or lies within the full budget's noise of it:
the 95% t-interval of their paired difference at full budget contains zero.
"""
import dataclasses
import functools
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402
import preprocessing  # noqa: E402
import run_experiments as rx  # noqa: E402
import study_results  # noqa: E402

FACTORS = {"mlp": ("mlp_activation", "mlp_width", "mlp_dropout"),
           "cnn": ("cnn_pool", "cnn_head_mode", "cnn_ablation")}  # pooling, joint vs frozen, a regulariser
SEEDS = (0, 1)
FIELDS = ("key", "val_acc", "train_acc", "seconds")  # what a row keeps of its run
_splits = functools.cache(preprocessing.load_splits)  # the data, read once per worker process


def _train(spec: rx.RunSpec) -> dict:
    return rx.run_on_worker(spec, _splits(), 1, "cpu")[0]


def _same_run(config: dict, budget: rx.Budget) -> str:
    return json.dumps({"config": config, "budget": dataclasses.asdict(budget)}, sort_keys=True)


def jobs(model: str, manifest: dict, records: dict) -> list[dict]:
    """One row per stage x setting x budget x seed, with the spec that trains it: the stage's grid runs as the
    study ran them, and the same configurations at the full budget."""
    plan = rx.FULL_PLAN
    full = plan.mlp_final if model == "mlp" else plan.cnn_final
    out = []
    for sid in FACTORS[model]:
        st = manifest["stages"][sid]
        other = st["winner"] if st["winner"] != st["incumbent"] else max(  # else the runner-up
            (v for v, r in st["rows"].items() if v != st["winner"] and r["eligible"]),
            key=lambda v: st["rows"][v]["mean"], default=None)
        for level in (st["incumbent"], other) if other else ():
            grid = [records[r["key"]] for r in manifest["runs"]
                    if r["study"] == sid and r["variant"] == level and r["seed"] in SEEDS]
            for rec in sorted(grid, key=lambda r: r["seed"]):
                cfg = {**rec["config"], "epochs": rx.START[model]["epochs"]}  # the grid's budget undone
                for name, config, budget in (("grid", rec["config"], rx.Budget(**rec["budget"])), ("full", cfg, full)):
                    out.append({"model": model, "factor": sid, "level": level, "budget": name, "seed": rec["seed"],
                                "spec": rx.make_spec(model, sid, level, rec["seed"], config, budget, "grid", plan)})
    return out


def verdicts(rows: list[dict]) -> list[dict]:
    """Per factor: each budget's mean per level, both winners, the paired full-budget difference between
    them with its 95% interval, and whether the factor passes."""
    out = []
    for (model, factor) in dict.fromkeys((r["model"], r["factor"]) for r in rows):
        acc = {(r["level"], r["budget"], r["seed"]): r["val_acc"] for r in rows
               if (r["model"], r["factor"]) == (model, factor)}
        levels = list(dict.fromkeys(lv for lv, _, _ in acc))
        mean = {(lv, b): float(np.mean([acc[lv, b, s] for s in SEEDS])) for lv in levels for b in ("grid", "full")}
        grid, full = (max(levels, key=lambda lv: mean[lv, b]) for b in ("grid", "full"))
        runs = {lv: [{"seed": s, "val_acc": acc[lv, "full", s]} for s in SEEDS] for lv in (grid, full)}
        d = study_results.paired_difference(runs[grid], runs[full])  # its 95% t-interval
        out.append({"model": model, "factor": factor, "means": {f"{lv} {b}": m for (lv, b), m in mean.items()},
                    "grid_winner": grid, "full_winner": full, "diff": d["diff"], "ci": d["ci"],
                    "passes": grid == full or bool(d["ci"][0] <= 0 <= d["ci"][1])})
    return out


def main(argv=None) -> None:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("mlp", "cnn"), help="one model's factors (default: both)")
    p.add_argument("--results-dir", type=cli.path_arg, default="results", help="the study's results (default: results)")
    args = p.parse_args(argv)
    records = study_results.Registry(args.results_dir, log=lambda *a: None, read_only=True).records
    manifest = study_results.load_manifest(args.results_dir, log=lambda *a: None)
    models = [m for m in FACTORS if args.only in (None, m)]
    if missing := [sid for m in models for sid in FACTORS[m] if sid not in manifest["stages"]]:
        p.error(f"{args.results_dir} holds no finished study with stages {', '.join(missing)}: run the study first")
    done = {_same_run(r["config"], rx.Budget(**r["budget"])): r for r in records.values()}
    rows = [row for m in ("cnn", "mlp") if m in models for row in jobs(m, manifest, records)]
    specs = [row.pop("spec") for row in rows]
    found = [done.get(_same_run(spec.config, spec.budget)) for spec in specs]
    # same key, same numbers (RunSpec.key): a configuration two rows share is trained once
    todo = {spec.key: spec for spec, run in zip(specs, found) if run is None}
    with ProcessPoolExecutor(2) as pool:
        trained = dict(zip(todo, pool.map(_train, todo.values())))
    for row, spec, run in zip(rows, specs, found):
        row.update({"reused": run is not None, **{k: (run or trained[spec.key])[k] for k in FIELDS}})
    out = Path(args.results_dir) / "grid_budget.json"
    if args.only and out.exists():  # the other model's rows stay
        rows += [r for r in json.loads(out.read_text())["rows"] if r["model"] != args.only]
    result = verdicts(rows)
    cli.atomic_write(out, json.dumps({"rows": rows, "factors": result}, indent=1))
    for v in result:
        print(f"{v['model']} {v['factor']:<15} " + "  ".join(f"{k} {100 * m:.2f}" for k, m in v["means"].items())
              + f"  grid winner {v['grid_winner']}, full {v['full_winner']}: {'passes' if v['passes'] else 'FAILS'}"
              f" (full-budget difference {100 * v['diff']:+.2f}, 95% [{100 * v['ci'][0]:+.2f}, {100 * v['ci'][1]:+.2f}])")
    print(f"{len(todo)} runs trained, {sum(r['reused'] for r in rows)} rows read from the study's runs")


if __name__ == "__main__":
    sys.exit(main())
