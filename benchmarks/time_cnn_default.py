"""The CNN default's training time as a user meets it: `python cnn_torch.py --no-test`, timed wall to wall.

    python benchmarks/time_cnn_default.py                 # seeds 0, 1, 2 one after another: ~18 min here
    python benchmarks/time_cnn_default.py --seeds 0 --out /tmp/timing.jsonl

Each seed runs alone (run nothing else meanwhile), with the module defaults and the test set left unread;
its row (the command, wall and training seconds, validation accuracy, precision, threads, the config) is
appended to --out. The median of the wall seconds is the figure the README and the report quote.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", type=cli.seed_list_arg, help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--out", default=str(ROOT / "results" / "cnn_default_timing.jsonl"), help="JSON lines, appended")
    args = p.parse_args(argv)
    for seed in args.seeds:
        command = ["python", "cnn_torch.py", "--no-test", "--no-progress", "--seed", str(seed)]
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *command[1:], "--json", f"{tmp}/run.json"], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            out = json.loads(Path(f"{tmp}/run.json").read_text())
        row = {"command": " ".join(command), "seed": seed, "wall_seconds": round(wall, 2),
               "seconds": round(out["seconds"], 2), "val_acc": out["val"]["acc"], "precision": out["precision"],
               "device": out["device"], "cores": os.cpu_count(), "config": out["config"]}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"seed {seed}: {wall:.1f} s wall, val {row['val_acc']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
