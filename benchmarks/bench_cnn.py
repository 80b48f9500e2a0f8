"""Seconds per training epoch of the CNN variants on this machine, and the training loop's overhead.

    python benchmarks/bench_cnn.py                  # ~2-3 minutes on a 2-core CPU
    python benchmarks/bench_cnn.py --n-images 1280 --repeats 1   # quicker, noisier
    python benchmarks/bench_cnn.py --overhead-only                # only the loop-overhead figure

For each variant (pool x filter schedule, everything else as CNNConfig's defaults) it times one epoch of
the real training loop (cnn_torch.fit: shuffling, batch indexing, augmentation, the numpy head through the
gradient bridge, the schedule, the metrics) on `--n-images` training images and scales it to the 54,000
images of a full epoch. For the default configuration it also times, side by side in the same process and
interleaved, the bare model work on the same batches -- forward, loss, backward and optimizer step of the
same backbone with an all-torch twin of the head (no augmentation, no indexing, no numpy) -- and prints
the loop's overhead over it. The best of `--repeats` runs is kept, since other processes on the machine can
only make a run slower. It finally compares the precision / memory-format options the config offers.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import cnn_torch  # noqa: E402
from cnn_torch import CNNConfig  # noqa: E402
from preprocessing import IMAGE_SIDE, NUM_CLASSES  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

FULL_EPOCH = 54_000
# (filters, base_filters): the default list (None), constant at 32, doubling from 8 (8 ... 128)
VARIANT_FILTERS = ((None, None), ("constant", 32), ("double", 8))


def make_data(n: int, seed: int = 0) -> dict:
    """Random images and labels: speed does not depend on the pixel values."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return {"X": torch.rand(n, 1, IMAGE_SIDE, IMAGE_SIDE, generator=g), "y": y.numpy(), "y_device": y,
            "X_val": torch.rand(16, 1, IMAGE_SIDE, IMAGE_SIDE, generator=g), "y_val": np.zeros(16, dtype=np.int64)}


def backbone_of(config: CNNConfig) -> cnn_torch.CNNBackbone:
    backbone = cnn_torch.build_backbone(config)
    return backbone.to(memory_format=torch.channels_last) if config.channels_last else backbone


def batches_of(config: CNNConfig, data: dict) -> list:
    """The training images in consecutive batches, in the config's memory format."""
    X, y, b = data["X"], data["y_device"], config.batch_size
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    return [(X[i:i + b].contiguous(memory_format=fmt), y[i:i + b]) for i in range(0, len(X), b)]


def loop_epoch_seconds(config: CNNConfig, data: dict) -> float:
    """One epoch of the real training loop; returns its training-pass seconds (validation excluded)."""
    backbone = backbone_of(config)
    head = cnn_torch.ScratchHead(cnn_torch.build_head(config, backbone.feature_dim), config)
    fit = cnn_torch.fit(replace(config, epochs=1), backbone, head, data, torch.device("cpu"),
                        progress=False, log=lambda line: None, phase="joint")
    return fit["history"][0]["train_seconds"]


def bare_epoch_seconds(config: CNNConfig, data: dict) -> float:
    """The same model's forward / loss / backward / step alone (cnn_torch.train_step with the numpy head),
    over pre-sliced batches of the same size: no shuffling, indexing, augmentation, schedule or metrics."""
    backbone = backbone_of(config)
    head = cnn_torch.ScratchHead(cnn_torch.build_head(config, backbone.feature_dim), config)
    opt = cnn_torch.make_torch_optimizer(config, list(backbone.named_parameters()), config.lr)
    batches = batches_of(config, data)
    backbone.train()
    t0 = time.perf_counter()
    for x, t in batches:
        cnn_torch.train_step(backbone, head, opt, x, t, config)
    return time.perf_counter() - t0


def torch_twin_epoch_seconds(config: CNNConfig, data: dict) -> float:
    """As bare_epoch_seconds, with an all-torch twin of the head instead of the numpy one."""
    backbone = backbone_of(config)
    dims = [backbone.feature_dim, *config.head_hidden, NUM_CLASSES]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers += [nn.ReLU(), nn.Dropout(config.head_dropout)]
    head = nn.Sequential(*layers)
    params = list(backbone.named_parameters()) + list(head.named_parameters())
    opt = cnn_torch.make_torch_optimizer(config, params, config.lr)
    batches = batches_of(config, data)
    backbone.train()
    head.train()
    t0 = time.perf_counter()
    for x, t in batches:
        with cnn_torch._autocast(x.device, config.precision):
            features = backbone(x).float()
        loss = F.cross_entropy(head(features), t)  # the head in float32, as the numpy head computes it
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-images", type=int, default=2560, help="training images timed per epoch (scaled to 54k)")
    p.add_argument("--repeats", type=int, default=2, help="runs per measurement; the fastest is kept")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--overhead-only", action="store_true", help="only the training loop's overhead figure")
    args = p.parse_args(argv)
    if args.n_images < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--n-images, --repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    base = CNNConfig(device="cpu")
    data = make_data(args.n_images)
    scale = FULL_EPOCH / args.n_images
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.n_images} images per timed "
          f"epoch, scaled to {FULL_EPOCH}; best of {args.repeats}. Defaults: filters {base.filters}, batch "
          f"{base.batch_size}, BN {base.batchnorm}, precision {base.precision}, channels_last "
          f"{base.channels_last}, augment {base.augment}, head {base.head_hidden}.")
    print("Other processes on a shared machine make every number here an upper bound.\n")
    if args.overhead_only:
        with threadpool_limits(limits=1, user_api="blas"):  # as train() runs
            overhead(args, base, data)
        return 0
    print("Training loop with numpy's OpenBLAS at its default thread count (as without the guard in train()):")
    free = min(loop_epoch_seconds(base, data) for _ in range(args.repeats)) * scale
    with threadpool_limits(limits=1, user_api="blas"):
        guarded = min(loop_epoch_seconds(base, data) for _ in range(args.repeats)) * scale
    print(f"  OpenBLAS free: {free:.1f} s/epoch   OpenBLAS single-threaded: {guarded:.1f} s/epoch\n")
    with threadpool_limits(limits=1, user_api="blas"):  # as train() runs
        run_all(args, base, data)
    return 0


def run_all(args, base: CNNConfig, data: dict) -> None:
    scale = FULL_EPOCH / args.n_images
    print("| pool | filters | feature_dim | params | s/epoch (54k) |")
    print("|---|---|---:|---:|---:|")
    for filters, base_filters in VARIANT_FILTERS:
        for pool in cnn_torch.POOLS:
            cfg = replace(base, pool=pool, filters=filters or base.filters,
                          base_filters=base_filters or base.base_filters)
            sec = min(loop_epoch_seconds(cfg, data) for _ in range(args.repeats)) * scale
            b = cnn_torch.build_backbone(cfg)
            head = cnn_torch.build_head(cfg, b.feature_dim)
            label = ",".join(map(str, b.channels))
            print(f"| {pool} | {label} | {b.feature_dim} | {b.n_params + head.n_params:,} | {sec:.1f} |", flush=True)

    overhead(args, base, data)
    precision_table(args, base, data)


def overhead(args, base: CNNConfig, data: dict) -> None:
    scale = FULL_EPOCH / args.n_images
    print("\nTraining loop vs bare forward/backward/step, default configuration, interleaved:")
    loop, bare, twin = [], [], []
    for _ in range(max(3, args.repeats)):
        bare.append(bare_epoch_seconds(base, data))
        loop.append(loop_epoch_seconds(base, data))
        twin.append(torch_twin_epoch_seconds(base, data))
    lo, ba, tw = min(loop) * scale, min(bare) * scale, min(twin) * scale
    print(f"  bare model work: {ba:.1f} s/epoch   training loop: {lo:.1f} s/epoch   "
          f"overhead {100 * (lo / ba - 1):+.1f}% (target <= 10%)")
    print(f"  (the same bare work with an all-torch twin of the head: {tw:.1f} s/epoch)")


def precision_table(args, base: CNNConfig, data: dict) -> None:
    scale = FULL_EPOCH / args.n_images
    print("\nPrecision and memory format (training loop, default configuration, interleaved):")
    options = [(p, cl) for p in cnn_torch.PRECISIONS for cl in (False, True)]
    times: dict = {o: [] for o in options}
    for _ in range(args.repeats):
        for precision, channels_last in options:
            cfg = replace(base, precision=precision, channels_last=channels_last)
            times[(precision, channels_last)].append(loop_epoch_seconds(cfg, data))
    for (precision, channels_last), ts in times.items():
        print(f"  precision {precision:4s} channels_last {str(channels_last):5s}: {min(ts) * scale:.1f} s/epoch")


if __name__ == "__main__":
    sys.exit(main())
