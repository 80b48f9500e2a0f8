"""Does a grid budget rank the MLP's dropout levels as the full budget does? The evidence behind the study's
MLP grid budget (run_experiments.FULL_PLAN.mlp_grid).

    python benchmarks/mlp_grid_budget.py          # about 10 minutes on the 2-core course CPU

Trains the default MLP with dropout 0, 0.3 (the default) and 0.5, seed 0, at the full budget and at each
candidate grid budget, through the study's own run function (one thread a run, two runs at a time), and
prints each budget's validation accuracies and whether it orders the three levels as the full budget does.
Dropout is the factor that failed to transfer: a 6-epoch grid chose no dropout, which lost at full budget.
"""
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import preprocessing  # noqa: E402
import run_experiments as rx  # noqa: E402

BUDGETS = {"full: 54,000 images x 20 epochs": rx.Budget(None, None, None),
           "20,000 images x 6 epochs (the old grid)": rx.Budget(20000, None, 6),
           "54,000 images x 6 epochs": rx.Budget(None, None, 6),
           "20,000 images x 20 epochs": rx.Budget(20000, None, 20),
           "10,000 images x 20 epochs (the grid)": rx.Budget(10000, None, None)}
DROPOUTS = (0.0, 0.3, 0.5)
_splits = None


def _load():
    global _splits
    _splits = preprocessing.load_splits()


def val_acc(job: tuple[str, float]) -> float:
    budget, dropout = job
    cfg = rx.apply(rx.start_config("mlp", rx.FULL_PLAN), {"dropout": dropout})
    spec = rx.make_spec("mlp", "budget", f"{dropout}", 0, cfg, BUDGETS[budget], "grid", rx.FULL_PLAN)
    record, _ = rx.run_on_worker(spec, _splits, 1, "cpu")
    return record["val_acc"]


def main() -> int:
    jobs = [(b, p) for b in BUDGETS for p in DROPOUTS]
    with ProcessPoolExecutor(2, initializer=_load) as pool:
        accs = dict(zip(jobs, pool.map(val_acc, jobs)))
    order = {b: sorted(DROPOUTS, key=lambda p: -accs[b, p]) for b in BUDGETS}
    full = order[next(iter(BUDGETS))]
    print(f"{'budget':<42}" + "".join(f"  p={p:<5}" for p in DROPOUTS) + "  same order as full")
    for b in BUDGETS:
        print(f"{b:<42}" + "".join(f"  {100 * accs[b, p]:6.2f}" for p in DROPOUTS) + f"  {order[b] == full}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
