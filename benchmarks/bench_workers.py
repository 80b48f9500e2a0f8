"""Local Dask workers against one worker: the same study runs, side by side in one invocation.

    python benchmarks/bench_workers.py            # about 5 minutes on the 2-core course CPU

Runs a small set of the study's own grid runs (the four MLP activation levels and two CNN pooling levels,
seed 0; the CNN on a smaller subset) three ways on the real data:
  1 worker,  1 thread    -- the records the parallel run must reproduce exactly
  1 worker,  all threads -- the study before Dask: one run at a time on every core
  2 workers, 1 thread each
It checks that the 2-worker records equal the 1-worker, 1-thread ones (same keys, same accuracies), then prints
the wall times; the last line is `2 workers / 1 worker: ratio X` (target: at most 0.8).
"""
import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import preprocessing  # noqa: E402
import run_experiments as rx  # noqa: E402
import study_results  # noqa: E402


def bench_specs() -> list[rx.RunSpec]:
    plan = dataclasses.replace(rx.FULL_PLAN, cnn_grid=rx.Budget(subset=3000, n_eval=None, epochs=2))
    runs = []
    for stage, levels in ((rx.STAGE["mlp_activation"], 4), (rx.STAGE["cnn_pool"], 2)):
        cfg, grid = rx.start_config(stage.model, plan), plan.mlp_grid if stage.model == "mlp" else plan.cnn_grid
        runs += [rx.make_spec(stage.model, stage.id, lv.variant, 0, rx.apply(cfg, lv.changes), grid, "grid", plan)
                 for lv in stage.levels(cfg)[:levels]]
    return runs


def timed(splits, specs, workers: int, threads: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as out:
        client, cluster = rx.start_client(workers)
        with cluster, client:
            engine = rx.Engine(client, splits, study_results.Registry(out), device="cpu", threads=threads,
                               log=lambda *a: None)
            t0 = time.perf_counter()
            records = engine.run(specs)
            return time.perf_counter() - t0, {r["key"]: (r["val_acc"], r["train_loss"]) for r in records}


def main() -> None:
    splits, specs, cores = preprocessing.load_splits(), bench_specs(), os.cpu_count() or 1
    one, one_records = timed(splits, specs, 1, 1)
    serial, _ = timed(splits, specs, 1, cores)
    two, two_records = timed(splits, specs, 2, 1)
    if one_records != two_records:
        raise SystemExit("error: 2 workers gave other records than 1 worker")
    print(f"{len(specs)} study runs (4 MLP, 2 CNN); records of 1 and 2 workers identical")
    for label, seconds in (("1 worker, 1 thread", one), (f"1 worker, {cores} threads (the study before Dask)", serial),
                           ("2 workers, 1 thread each", two)):
        print(f"{label + ':':<48} {seconds:7.1f} s")
    print(f"2 workers / 1 worker at {cores} threads: ratio {two / serial:.2f}")
    print(f"2 workers / 1 worker: ratio {two / one:.2f}")


if __name__ == "__main__":
    sys.exit(main())
