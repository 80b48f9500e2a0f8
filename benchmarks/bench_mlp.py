"""Speed of the numpy MLP against the same nn.Sequential in PyTorch, one training epoch each, side by side.

Both train the same network (MLPConfig's defaults unless overridden; torch's is report.gradcheck's twin of
ours, from the same initial weights) on the same batches in the same order, float32, the same thread count,
the same optimizer at a constant learning rate. The two are alternated --repeats times and the medians
compared. The data are uniform random pixels of the training set's shape: the time of an epoch does not
depend on pixel values, and this needs no download.

    python benchmarks/bench_mlp.py                 # 54,000 images, 3 repeats
    python benchmarks/bench_mlp.py --n 10000 --repeats 5
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for its modules
import mlp_scratch as ms  # noqa: E402
from preprocessing import INPUT_DIM, NUM_CLASSES  # noqa: E402
from report.gradcheck import torch_twin  # noqa: E402

OPTIMIZERS = {"adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),  # the same on both sides
              "sgd": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9))}


def torch_epoch(net, opt, X: torch.Tensor, y: torch.Tensor, order: np.ndarray, batch_size: int) -> None:
    for idx in torch.from_numpy(order).split(batch_size):
        loss = nn.functional.cross_entropy(net(X[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # ours also reads each batch's loss back


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ms.MLPConfig()  # the defaults: the chosen configuration
    p.add_argument("--hidden", type=int, nargs="*", default=d.hidden, help="hidden widths")
    p.add_argument("--activation", choices=ms.ACTIVATIONS, default=d.activation, help="activation")
    p.add_argument("--dropout", type=float, default=d.dropout, help="drop probability")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="mini-batch size")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="optimizer (both sides)")
    p.add_argument("--n", type=int, default=54000, help="training images per epoch")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed epochs per framework")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads; numpy's OpenBLAS "
                   "uses every core unless OPENBLAS_NUM_THREADS says otherwise, so keep the two equal")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    X, y = rng.random((args.n, INPUT_DIM), dtype=np.float32), rng.integers(0, NUM_CLASSES, args.n)
    model = ms.MLP(INPUT_DIM, args.hidden, NUM_CLASSES, args.activation, args.dropout, seed=0)
    net = torch_twin(model)  # the same layers, from the same initial weights
    torch_opt, hyper = OPTIMIZERS[args.optimizer]
    ours, theirs = ms.make_optimizer(args.optimizer, **hyper), torch_opt(net.parameters(), **hyper)
    print(f"MLP {'-'.join(map(str, [INPUT_DIM, *args.hidden, NUM_CLASSES]))} {args.activation}, dropout "
          f"{args.dropout}, batch {args.batch_size}, {args.optimizer}, {args.n} images/epoch, float32; torch threads "
          f"{torch.get_num_threads()}, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")

    def epoch_seconds(n: int, seed: int) -> tuple[float, float]:
        """One epoch of each on the first n images, the very same batches in the same order."""
        t0 = time.perf_counter()
        ms.train_epoch(model, ours, X[:n], y[:n], args.batch_size, np.random.default_rng(seed))
        t1 = time.perf_counter()
        order = np.random.default_rng(seed).permutation(n)
        torch_epoch(net, theirs, torch.from_numpy(X[:n]), torch.from_numpy(y[:n]), order, args.batch_size)
        return t1 - t0, time.perf_counter() - t1

    epoch_seconds(2048, 1)  # warm-up (allocations, thread pools, lazy init), untimed
    times = [epoch_seconds(args.n, 100 + r) for r in range(args.repeats)]  # alternating: ours, torch, ours, ...
    print("  each repeat, ours / torch: " + ", ".join(f"{a:.2f}s / {b:.2f}s" for a, b in times))
    ours_s, torch_s = (statistics.median(t) for t in zip(*times))
    print(f"epoch time (median of {args.repeats}): ours {ours_s:.2f}s  torch {torch_s:.2f}s  "
          f"ratio ours/torch {ours_s / torch_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
