"""Speed of the numpy MLP against an identical PyTorch model, one training epoch each, side by side.

Both train the same architecture (MLPConfig's defaults unless overridden) on the same batches in the same
order, float32, the same thread count, the same optimizer (AdamW) at a constant learning rate. The two are
alternated --repeats times and the medians compared. The data are uniform random pixels of the training
set's shape: the time of an epoch does not depend on pixel values, and this needs no download.

Also prints our GFLOP/s against plain numpy matmuls of exactly the shapes an epoch multiplies, which is
the most a numpy implementation could reach on this machine.

    python benchmarks/bench_mlp.py                 # 54,000 images, 3 repeats
    python benchmarks/bench_mlp.py --n 10000 --repeats 5
"""
from __future__ import annotations

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

TORCH_ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(ms.LEAKY_SLOPE), "tanh": nn.Tanh,
                     "gelu": lambda: nn.GELU(approximate="tanh"), "sigmoid": nn.Sigmoid}


def torch_mlp(hidden: list[int], activation: str, dropout: float) -> nn.Sequential:
    """The same architecture in plain torch: Linear -> activation -> Dropout per hidden width -> Linear."""
    dims = [INPUT_DIM, *hidden, NUM_CLASSES]
    mods: list[nn.Module] = []
    for i in range(len(dims) - 1):
        mods.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(hidden):
            mods += [TORCH_ACTIVATIONS[activation]()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
    return nn.Sequential(*mods)


def torch_epoch(net, opt, X: torch.Tensor, y: torch.Tensor, order: np.ndarray, batch_size: int) -> float:
    net.train()
    order_t = torch.from_numpy(order)
    total = 0.0
    for start in range(0, len(X), batch_size):
        idx = order_t[start:start + batch_size]
        xb, yb = X[idx], y[idx]
        loss = nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)  # ours also reads each batch's loss back
    return total / len(X)


def matmul_epoch_seconds(dims: list[int], n: int, batch_size: int, repeats: int = 2) -> tuple[float, float]:
    """Seconds for only the matmuls of one epoch (forward, dW, and dX except for the first layer), with
    preallocated outputs, and their FLOP count."""
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((a, b), dtype=np.float32) for a, b in zip(dims[:-1], dims[1:])]
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    flops = 0.0
    for m in sizes:
        for i, w in enumerate(ws):
            flops += 2.0 * m * w.size * (2 if i == 0 else 3)
    best = float("inf")
    acts = [rng.standard_normal((batch_size, d), dtype=np.float32) for d in dims]
    outs = [np.empty((batch_size, d), np.float32) for d in dims]
    dws = [np.empty_like(w) for w in ws]
    for _ in range(repeats):
        t0 = time.perf_counter()
        for m in sizes:
            for i, w in enumerate(ws):
                np.matmul(acts[i][:m], w, out=outs[i + 1][:m])
            for i in reversed(range(len(ws))):
                np.matmul(acts[i][:m].T, acts[i + 1][:m], out=dws[i])
                if i > 0:
                    np.matmul(acts[i + 1][:m], ws[i].T, out=outs[i][:m])
        best = min(best, time.perf_counter() - t0)
    return best, flops


def main(argv: list[str] | None = None) -> int:
    d = ms.MLPConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, nargs="*", default=d.hidden, help="hidden widths")
    p.add_argument("--activation", choices=ms.ACTIVATIONS, default=d.activation, help="activation")
    p.add_argument("--dropout", type=float, default=d.dropout, help="drop probability")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="mini-batch size")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="optimizer (both sides)")
    p.add_argument("--n", type=int, default=54000, help="training images per epoch")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed epochs per framework")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads; numpy's OpenBLAS "
                   "uses every core unless OPENBLAS_NUM_THREADS says otherwise, so keep the two equal")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    X = rng.random((args.n, INPUT_DIM), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, args.n)
    model = ms.MLP(INPUT_DIM, args.hidden, NUM_CLASSES, args.activation, args.dropout, seed=0)
    net = torch_mlp(args.hidden, args.activation, args.dropout)
    if args.optimizer == "adamw":
        ours = ms.make_optimizer("adamw", 1e-3, weight_decay=1e-2)
        theirs = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    else:
        ours = ms.make_optimizer("sgd", 1e-2, momentum=0.9)
        theirs = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    print(f"MLP {INPUT_DIM}-{'-'.join(map(str, args.hidden))}-{NUM_CLASSES} {args.activation}, dropout {args.dropout}, "
          f"batch {args.batch_size}, {args.optimizer}, {args.n} images/epoch, float32")
    print(f"threads: torch {torch.get_num_threads()}, OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, numpy {np.__version__}, torch {torch.__version__}")
    # Warm-up (allocations, thread pools, lazy init), untimed.
    ms.train_epoch(model, ours, X[:2048], y[:2048], args.batch_size, np.random.default_rng(1))
    torch_epoch(net, theirs, Xt[:2048], yt[:2048], np.arange(2048), args.batch_size)

    t_ours, t_torch = [], []
    for r in range(args.repeats):
        order_seed = 100 + r
        t0 = time.perf_counter()
        ms.train_epoch(model, ours, X, y, args.batch_size, np.random.default_rng(order_seed))
        t_ours.append(time.perf_counter() - t0)
        order = np.random.default_rng(order_seed).permutation(args.n)  # the very same batches
        t0 = time.perf_counter()
        torch_epoch(net, theirs, Xt, yt, order, args.batch_size)
        t_torch.append(time.perf_counter() - t0)
        print(f"  repeat {r + 1}: ours {t_ours[-1]:.2f}s  torch {t_torch[-1]:.2f}s")
    ours_s, torch_s = statistics.median(t_ours), statistics.median(t_torch)
    mm_s, flops = matmul_epoch_seconds([INPUT_DIM, *args.hidden, NUM_CLASSES], args.n, args.batch_size)
    print(f"epoch time (median of {args.repeats}): ours {ours_s:.2f}s  torch {torch_s:.2f}s  "
          f"ratio ours/torch {ours_s / torch_s:.2f}x")
    print(f"GFLOP/s of the epoch's matmuls ({flops / 1e9:.0f} GFLOP): ours {flops / ours_s / 1e9:.1f}, "
          f"torch {flops / torch_s / 1e9:.1f}, plain numpy matmuls alone {flops / mm_s / 1e9:.1f} "
          f"({mm_s:.2f}s; ours reaches {mm_s / ours_s:.0%} of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
