"""Seconds per training epoch of the CNN variants on this machine, the training loop's overhead, its throughput
against the machine's bf16 matrix-product peak, and the default recipe's seconds against the old one's.

    python benchmarks/bench_cnn.py                  # ~3 minutes on a 2-core CPU
    python benchmarks/bench_cnn.py --n-images 1280 --repeats 1   # quicker, noisier
    python benchmarks/bench_cnn.py --overhead-only                # only the loop-overhead figure

For each variant (pool x filter schedule, then the precision / memory-format options; everything else as
CNNConfig's defaults) it times one epoch of the real training loop (cnn_torch.fit: shuffling, batch
indexing, augmentation, the numpy head through the gradient bridge, the schedule, the metrics) on
`--n-images` random training images and scales it to the 54,000 images of a full epoch. For the default
configuration it then times, interleaved in the same process, the bare model work on the same batches
(cnn_torch.train_step: forward, loss, backward and both optimizers' steps; no shuffling, indexing,
augmentation, schedule or metrics) and prints the loop's overhead over it; the loop's arithmetic rate
(3 x 2 x multiply-adds per image: forward and backward) over the best bf16 matrix product measured in the same
process; and the default recipe's backbone seconds (epochs x s/epoch at its batch size) over OLD_RECIPE's.
The best of `--repeats` runs is kept, since other processes on the machine can only make a run slower.
numpy's BLAS is held at one thread throughout, as cnn_torch.train holds it.
"""
import argparse
import sys
import time
import timeit
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import cnn_torch  # noqa: E402
from preprocessing import IMAGE_SIDE, NUM_CLASSES  # noqa: E402

FULL_EPOCH = 54_000
# The default filter list, constant at 32, doubling from 8 (8 ... 128); then the other precision / format options.
VARIANTS = [{"pool": pool, **filters} for filters in ({}, {"filters": "constant", "base_filters": 32},
                                                      {"filters": "double", "base_filters": 8})
            for pool in cnn_torch.POOLS]
VARIANTS += [{"precision": p, "channels_last": cl} for p in ("fp32", "bf16") for cl in (False, True)
             if (p, cl) != (cnn_torch.CNNConfig.precision, cnn_torch.CNNConfig.channels_last)]


# The recipe before the short one (benchmarks/cnn_recipe_sweep.py's DEFAULT26): 26 epochs at batch 128, lr 3e-3.
OLD_RECIPE = {"epochs": 26, "batch_size": 128, "lr": 3e-3, "head_epochs": 20}


def matmul_peak(dtype=torch.bfloat16, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` n x n matrix products in `dtype`: the machine's practical peak."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n ** 3 / min(timeit.repeat(lambda: a @ b, number=1, repeat=repeats))


def make_data(n: int, seed: int = 0) -> dict:
    """Random images and labels, as cnn_torch.fit takes them: speed does not depend on the pixel values."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return {"X": torch.rand(n, 1, IMAGE_SIDE, IMAGE_SIDE, generator=g), "y": y.numpy(), "y_device": y,
            "X_val": torch.rand(16, 1, IMAGE_SIDE, IMAGE_SIDE, generator=g), "y_val": np.zeros(16, dtype=np.int64)}


def model_of(config: cnn_torch.CNNConfig) -> tuple[cnn_torch.CNNBackbone, cnn_torch.ScratchHead]:
    backbone = cnn_torch.build_backbone(config).to(memory_format=cnn_torch.memory_format(config))
    return backbone, cnn_torch.ScratchHead(cnn_torch.build_head(config, backbone.feature_dim), config)


def loop_seconds(config: cnn_torch.CNNConfig, data: dict) -> float:
    """One epoch of the real training loop: its training pass's seconds (validation excluded)."""
    fit = cnn_torch.fit(replace(config, epochs=1), *model_of(config), data, torch.device("cpu"), progress=False,
                        log=lambda line: None, phase="joint")
    return fit["history"][0]["train_seconds"]


def bare_seconds(config: cnn_torch.CNNConfig, data: dict) -> float:
    """The same model's train_step alone, over consecutive batches sliced (in the config's format) beforehand."""
    backbone, head = model_of(config)
    optimizer = cnn_torch.make_torch_optimizer(config, list(backbone.named_parameters()), config.lr)
    fmt, b = torch.channels_last if config.channels_last else torch.contiguous_format, config.batch_size
    batches = [(data["X"][i:i + b].contiguous(memory_format=fmt), data["y_device"][i:i + b])
               for i in range(0, len(data["X"]), b)]
    backbone.train()
    t0 = time.perf_counter()
    for x, y in batches:
        cnn_torch.train_step(backbone, head, optimizer, x, y, config)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-images", type=int, default=2560, help="training images timed per epoch (scaled to 54k)")
    p.add_argument("--repeats", type=int, default=2, help="runs per measurement; the fastest is kept")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--overhead-only", action="store_true", help="only the training loop's overhead figure")
    args = p.parse_args(argv)
    if min(args.n_images, args.repeats, args.threads) < 1:
        p.error("--n-images, --repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    base, data, scale = cnn_torch.CNNConfig(device="cpu"), make_data(args.n_images), FULL_EPOCH / args.n_images
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.n_images} images per timed epoch, "
          f"scaled to {FULL_EPOCH}; best of {args.repeats}. Other processes make every number an upper bound.\n")
    with threadpool_limits(limits=1, user_api="blas"):
        if not args.overhead_only:
            print("| pool | filters | precision | channels_last | feature_dim | params | s/epoch (54k) |\n"
                  "|---|---|---|---|---:|---:|---:|")
            for changes in VARIANTS:
                cfg = replace(base, **changes)
                sec = min(loop_seconds(cfg, data) for _ in range(args.repeats)) * scale
                b = cnn_torch.build_backbone(cfg)
                print(f"| {cfg.pool} | {','.join(map(str, b.channels))} | {cfg.precision} | {cfg.channels_last} | "
                      f"{b.feature_dim} | {b.n_params + cnn_torch.build_head(cfg, b.feature_dim).n_params:,} | "
                      f"{sec:.1f} |", flush=True)
        # interleaved, so that a busy spell slows both alike
        bare, loop = zip(*[(bare_seconds(base, data), loop_seconds(base, data)) for _ in range(max(3, args.repeats))])
        old = replace(base, **OLD_RECIPE)
        old_epoch = min(loop_seconds(old, data) for _ in range(args.repeats)) * scale
        peak = matmul_peak()
    epoch = min(loop) * scale
    rate = 6 * cnn_torch.build_backbone(base).conv_macs() * FULL_EPOCH / epoch
    print(f"\nDefault configuration: bare forward/backward/step {min(bare) * scale:.1f} s/epoch, training loop "
          f"{epoch:.1f} s/epoch: overhead {100 * (min(loop) / min(bare) - 1):+.1f}% (target <= 10%)")
    print(f"Throughput: {rate / 1e9:.1f} GFLOP/s of convolutions against a bf16 matrix-product peak of "
          f"{peak / 1e9:.1f} GFLOP/s measured here: ratio {rate / peak:.2f}")
    print(f"Recipe: default {base.epochs} epochs x {epoch:.1f} s = {base.epochs * epoch:.0f} s of backbone training; "
          f"old {old.epochs} x {old_epoch:.1f} s = {old.epochs * old_epoch:.0f} s: ratio "
          f"{base.epochs * epoch / (old.epochs * old_epoch):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
