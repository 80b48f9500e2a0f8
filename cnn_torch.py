"""A five-convolution PyTorch backbone whose features feed the scratch MLP of question 2 (assignment Q3).

    python cnn_torch.py                      # train the chosen configuration (CNNConfig's defaults)
    python cnn_torch.py --pool avg --kernel-size 5 --filters double --base-filters 16 --epochs 5
    python cnn_torch.py --head-mode frozen   # train the backbone first, then the MLP on frozen features
    python cnn_torch.py --describe           # the per-pooling-variant table of the README

Architecture (Q3a-c). Five 'same'-padded convolutions, each immediately followed by a ReLU (an optional
BatchNorm sits between a convolution and its ReLU), in three stages with a pooling site after each:

    stage 1 (28x28): conv1 -> ReLU -> conv2 -> ReLU -> POOL 2x2       -> 14x14
    stage 2 (14x14): conv3 -> ReLU -> conv4 -> ReLU -> POOL 2x2       ->  7x7
    stage 3 ( 7x7):  conv5 -> ReLU                  -> FINAL POOL     ->  3x3 (max, avg) or 1x1 (gap)
    flatten -> features (N, feature_dim) -> scratch MLP head (mlp_scratch.MLP) -> 10 logits

How `pool` fills the three sites, chosen so that the variants are a fair comparison -- the convolutions,
their spatial sizes and hence their compute are identical in all three; only the pooling differs:

    pool="max": 2x2 max pooling at all three sites; feature_dim = C5 * 3 * 3
    pool="avg": 2x2 average pooling at all three sites; feature_dim = C5 * 3 * 3
    pool="gap": 2x2 max pooling between the stages (as "max") and global average pooling at the final
                site; feature_dim = C5. "max" vs "avg" compares the downsampling operator, "max" vs "gap"
                compares how the last feature map becomes a vector (keep a coarse 3x3 layout vs average it
                away), which is the classic GAP trade-off (far fewer head parameters, no spatial layout).

`python cnn_torch.py --describe` prints the table (feature size, parameters, multiply-adds per image).

Filters: "constant" (base_filters in every layer), "double" (base_filters * 2**i for layer i) or an
explicit list of five counts such as "32,32,64,64,128" (base_filters is then unused).
Initialisation of the convolution weights (biases are zero): "random" N(0, 0.01^2); "xavier" Glorot normal,
std = sqrt(2 / (fan_in + fan_out)); "he" Kaiming normal for ReLU, std = sqrt(2 / fan_in), where
fan_in = C_in * k * k and fan_out = C_out * k * k. With BatchNorm the convolutions have no bias (BatchNorm's
shift replaces it).

The classifier (Q3d) is the numpy `MLP` of question 2. In the default joint mode every batch goes
images -> backbone (torch autograd) -> features -> MLP.forward (numpy) -> softmax_cross_entropy (hand-written)
-> MLP.backward gives dL/dfeatures -> features.backward(dL/dfeatures) continues the backward pass in torch;
a torch optimizer steps the backbone and the scratch optimizer steps the head. In frozen mode the backbone
is first trained with a temporary torch linear head, then its features are extracted (eval mode, no
gradients) and the scratch MLP is trained on them with mlp_scratch.train.

Input standardisation (global mean/std of the training pixels) happens inside the backbone and is saved
with it, so a saved classifier takes images scaled to [0, 1].

Chosen configuration (CNNConfig's defaults), picked on validation accuracy only:
- Architecture 32,32,64,64,128 filters, 3x3 kernels, max pooling, Xavier init, a frozen [256]-GELU scratch
  head (dropout 0.3). The study's grid (run_experiments.py) picked max pooling, Xavier, the frozen GELU head
  and, on its short budget, doubling 5x5 filters; at full budget the doubling 5x5 network of the same
  multiply-adds (7,14,28,56,112) scored lower on validation than this one, which the study's final stage
  trains beside it (results/summary.json, "finals").
- Recipe: BatchNorm, AdamW (backbone 3e-3, head 1e-3 peak, decoupled weight decay 5e-2), one-cycle, batch
  128, crop + flip augmentation, random erasing (p 0.5), label smoothing 0.1; bfloat16 autocast and
  channels-last (each measured faster on this CPU by benchmarks/bench_cnn.py). The recipe comes from
  benchmarks/cnn_recipe_sweep.py (11 recipes x 2 seeds on a GPU, read on validation; the rows are in
  results/cnn_recipe_sweep.jsonl): halving the multiply-adds of the earlier 11..176 / 5x5 network and
  training twice as many epochs, with the three regularisers, gave the best validation accuracy.
  Mirroring at test time (`tta`) did not help it on validation, so it is off.
- 26 epochs, to fit 15 minutes on the 2-core CPU with a margin: 30 epochs took 16.0 minutes there (val
  95.00%, test 94.07%).
The study's final run of it (results/summary.json): val 95.12%, test 94.22%, 13.2 minutes on the 2-core CPU;
`python cnn_torch.py` repeats it (same seed, same code, same numbers on the CPU).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import mlp_scratch
import preprocessing
from preprocessing import NUM_CLASSES, Splits

POOLS = ("max", "avg", "gap")
KERNELS = (3, 5, 7)
INITS = ("random", "xavier", "he")
FILTER_SCHEDULES = ("constant", "double")  # or an explicit comma-separated list of five counts
HEAD_MODES = ("joint", "frozen")
OPTIMIZERS = ("adamw", "adam", "sgd")  # names mlp_scratch.make_optimizer also knows, for the head
SCHEDULES = ("onecycle", "cosine")
PRECISIONS = ("fp32", "bf16")
N_CONV = 5
RANDOM_INIT_STD = 0.01  # the "random" scheme: a plain small Gaussian N(0, 0.01^2)
POOL_AFTER = (1, 3, 4)  # 0-based conv indices followed by a pooling site (see the module docstring)


# ----------------------------------------------------------------------------------------------------------
# Threads: numpy's OpenBLAS and torch's OpenMP pool must not both spin on the same two cores
# ----------------------------------------------------------------------------------------------------------
def _openblas_libs() -> list:
    """ctypes handles of the OpenBLAS libraries loaded in this process (numpy's bundled one), if any."""
    import ctypes
    import glob
    import os
    paths: set[str] = set()
    try:
        with open("/proc/self/maps") as maps:  # Linux: every shared library the process has loaded
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}
    except OSError:
        numpy_dir = os.path.dirname(np.__file__)
        for pattern in ("../numpy.libs/*openblas*", ".dylibs/*openblas*"):
            paths.update(glob.glob(os.path.join(numpy_dir, pattern)))
    libs = []
    for path in sorted(paths):
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            pass
    return libs


def _openblas_fn(lib, what: str):
    for name in (f"openblas_{what}", f"scipy_openblas_{what}64_", f"openblas_{what}64_"):
        fn = getattr(lib, name, None)
        if fn is not None:
            return fn
    return None


class single_threaded_blas:
    """Context manager: numpy's BLAS on one thread while torch trains, then restored.

    The head's matrices are small, and OpenBLAS threads that busy-wait between calls steal the cores from
    torch's OpenMP threads: measured here, a 2-core epoch took ~58 s with both pools at 2 threads and ~31 s
    with OpenBLAS at 1 (benchmarks/bench_cnn.py). A no-op where no OpenBLAS is found (MKL, Accelerate).
    """

    def __enter__(self):
        self.saved = []
        for lib in _openblas_libs():
            get, set_ = _openblas_fn(lib, "get_num_threads"), _openblas_fn(lib, "set_num_threads")
            if get is not None and set_ is not None:
                self.saved.append((set_, int(get())))
                set_(1)
        return self

    def __exit__(self, *exc):
        for set_, n in self.saved:
            set_(n)
        return False


# ----------------------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------------------
def parse_filters(filters: str | list[int], base_filters: int = 32) -> list[int]:
    """The five per-layer filter counts of a schedule name or an explicit list; ValueError if invalid."""
    if isinstance(filters, (list, tuple)):
        counts = [int(c) for c in filters]
    elif filters == "constant":
        counts = [base_filters] * N_CONV
    elif filters == "double":
        counts = [base_filters * 2 ** i for i in range(N_CONV)]
    else:
        try:
            counts = [int(c) for c in str(filters).replace(" ", "").split(",") if c != ""]
        except ValueError:
            raise ValueError(f"filters must be 'constant', 'double' or {N_CONV} comma-separated integers "
                             f"such as 16,32,64,64,128; got {filters!r}") from None
    if len(counts) != N_CONV or min(counts) < 1:
        raise ValueError(f"filters must give {N_CONV} positive counts, got {counts} from {filters!r}")
    return counts


def init_std(init: str, fan_in: int, fan_out: int) -> float:
    """The weight std each scheme draws with (the tests compare measured stds with this)."""
    if init == "random":
        return RANDOM_INIT_STD
    if init == "xavier":
        return math.sqrt(2.0 / (fan_in + fan_out))
    if init == "he":
        return math.sqrt(2.0 / fan_in)
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


class CNNBackbone(nn.Module):
    """Five conv+ReLU layers and three pooling sites: (N, 1, 28, 28) images in [0, 1] -> (N, feature_dim)."""

    def __init__(self, filters: str | list[int] = "48,48,96,96,192", kernel_size: int = 3, pool: str = "max",
                 init: str = "he", in_channels: int = 1, batchnorm: bool = False, base_filters: int = 32,
                 input_mean: float = 0.0, input_std: float = 1.0, image_size: int = 28):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if kernel_size not in KERNELS:
            raise ValueError(f"kernel_size must be one of {KERNELS}, got {kernel_size!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.channels = parse_filters(filters, base_filters)
        self.kernel_size, self.pool, self.init, self.batchnorm = kernel_size, pool, init, batchnorm
        self.in_channels, self.image_size = in_channels, image_size
        # Buffers, so that the standardisation travels with the state_dict and predict() takes [0, 1] pixels.
        self.register_buffer("input_mean", torch.tensor(float(input_mean)))
        self.register_buffer("input_std", torch.tensor(float(input_std)))

        layers: list[nn.Module] = []
        c_in, side = in_channels, image_size
        for i, c_out in enumerate(self.channels):
            # 'same' padding for odd kernels; no conv bias under BatchNorm (its shift does that job).
            layers.append(nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU())
            if i in POOL_AFTER:
                final = i == POOL_AFTER[-1]
                if final and pool == "gap":
                    layers.append(nn.AdaptiveAvgPool2d(1))
                    side = 1
                elif pool == "avg":
                    layers.append(nn.AvgPool2d(2))
                    side //= 2
                else:  # "max", and "gap" between the stages
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
            c_in = c_out
        layers.append(nn.Flatten())
        self.layers = nn.Sequential(*layers)
        self.feature_dim = self.channels[-1] * side * side
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1]
                std = init_std(self.init, m.in_channels * k, m.out_channels * k)
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def arch(self) -> dict:
        """Constructor arguments, JSON-able (what a checkpoint needs to rebuild the module)."""
        return {"filters": self.channels, "kernel_size": self.kernel_size, "pool": self.pool, "init": self.init,
                "in_channels": self.in_channels, "batchnorm": self.batchnorm, "image_size": self.image_size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean) / self.input_std  # (N, C, 28, 28), standardised
        return self.layers(x)                       # (N, feature_dim)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def conv_macs(self) -> int:
        """Multiply-adds of the five convolutions for one image (pooling and BN are negligible)."""
        macs, side = 0, self.image_size
        c_in = self.in_channels
        for i, c_out in enumerate(self.channels):
            macs += side * side * c_out * c_in * self.kernel_size ** 2
            if i in POOL_AFTER[:-1]:
                side //= 2
            c_in = c_out
        return macs


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass
class CNNConfig:
    """Every field is a command-line flag; the defaults are the chosen configuration (module docstring and
    README): chosen on validation by the study's final stage and benchmarks/cnn_recipe_sweep.py, with the
    number of epochs set by the 15-minute budget on a 2-core CPU."""
    filters: str = "32,32,64,64,128"  # "constant" | "double" | five counts
    base_filters: int = 32            # first-layer count for "constant" / "double"
    kernel_size: int = 3              # 3 | 5 | 7, 'same' padding
    pool: str = "max"                 # "max" | "avg" | "gap" (see the module docstring for the placement)
    init: str = "xavier"              # "random" N(0, 0.01^2) | "xavier" | "he"
    batchnorm: bool = True            # BN between each conv and its ReLU: trains far faster at a high rate
    head_mode: str = "frozen"         # "joint": trained through the scratch MLP | "frozen": MLP on fixed features
    head_hidden: list[int] = field(default_factory=lambda: [256])  # scratch MLP hidden widths
    head_activation: str = "gelu"     # any activation mlp_scratch knows
    head_dropout: float = 0.3         # drop probability after each hidden layer of the head
    head_epochs: int = 20             # frozen mode only: epochs of mlp_scratch.train on the features
    optimizer: str = "adamw"          # "adamw" | "adam" | "sgd" (momentum 0.9); the head uses the same kind
    lr: float = 3e-3                  # peak learning rate of the backbone
    head_lr: float = 1e-3             # peak learning rate of the scratch head
    momentum: float = 0.9             # SGD only
    weight_decay: float = 5e-2        # on conv / head weights, not on biases or BatchNorm (decoupled in AdamW)
    schedule: str = "onecycle"        # "onecycle" (25% warm-up, cosine down) | "cosine" (no warm-up)
    epochs: int = 26
    batch_size: int = 128
    augment: bool = True              # random crop (zero padding 2) + horizontal flip, on the whole batch
    erase: float = 0.5                # probability that a training image gets a random rectangle zeroed
    label_smoothing: float = 0.1      # training loss target (1 - e) * onehot + e / 10 (backbone and joint head)
    tta: bool = False                 # predict with the mean softmax of each image and its mirror image
    patience: int = 0                 # early stopping on val accuracy after this many bad epochs; 0 = off
    precision: str = "bf16"           # autocast the backbone to bfloat16: 1.9x faster on this CPU (AVX512-BF16);
                                      # use "fp32" on CPUs without native bf16, where autocast is slower
    channels_last: bool = True        # NHWC memory format: ~20% faster here with bf16 (bench_cnn.py)
    seed: int = 0
    subset: int | None = None         # train on a stratified subset of this many images (val/test stay whole)
    device: str = "auto"              # "auto" (cuda, then mps, then cpu) | "cpu" | "cuda" | "cuda:1" | "mps"

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """ValueError with a one-line message for any invalid field."""
        parse_filters(self.filters, self.base_filters)
        checks = [
            (self.base_filters >= 1, f"base_filters must be >= 1, got {self.base_filters}"),
            (self.kernel_size in KERNELS, f"kernel_size must be one of {KERNELS}, got {self.kernel_size}"),
            (self.pool in POOLS, f"pool must be one of {POOLS}, got {self.pool!r}"),
            (self.init in INITS, f"init must be one of {INITS}, got {self.init!r}"),
            (self.head_mode in HEAD_MODES, f"head_mode must be one of {HEAD_MODES}, got {self.head_mode!r}"),
            (all(h >= 1 for h in self.head_hidden), f"head_hidden widths must be >= 1, got {self.head_hidden}"),
            (0.0 <= self.head_dropout < 1.0, f"head_dropout must be in [0, 1), got {self.head_dropout}"),
            (self.head_epochs >= 1, f"head_epochs must be >= 1, got {self.head_epochs}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be positive, got {self.lr}"),
            (self.head_lr > 0 and math.isfinite(self.head_lr), f"head_lr must be positive, got {self.head_lr}"),
            (0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.patience >= 0, f"patience must be >= 0, got {self.patience}"),
            (0.0 <= self.erase <= 1.0, f"erase must be a probability in [0, 1], got {self.erase}"),
            (0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.subset is None or self.subset >= NUM_CLASSES,
             f"subset must be at least {NUM_CLASSES} images, got {self.subset}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.head_activation not in mlp_scratch.ACTIVATIONS:
            raise ValueError(f"head_activation must be one of {tuple(mlp_scratch.ACTIVATIONS)}, "
                             f"got {self.head_activation!r}")
        resolve_device(self.device)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda, then mps, then cpu; an explicit name must be available here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda[:i] or mps, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} requested but MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be auto, cpu, cuda[:i] or mps, got {name!r}")
    return device


def build_backbone(config: CNNConfig, input_mean: float = 0.0, input_std: float = 1.0) -> CNNBackbone:
    torch.manual_seed(config.seed)  # the weights depend on the seed only
    return CNNBackbone(config.filters, config.kernel_size, config.pool, config.init, 1, config.batchnorm,
                       config.base_filters, input_mean, input_std)


def build_head(config: CNNConfig, feature_dim: int) -> mlp_scratch.MLP:
    return mlp_scratch.MLP(feature_dim, list(config.head_hidden), NUM_CLASSES, activation=config.head_activation,
                           dropout=config.head_dropout, init="he", seed=config.seed)


# ----------------------------------------------------------------------------------------------------------
# The classifier: backbone + scratch MLP head
# ----------------------------------------------------------------------------------------------------------
def _as_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 1, 28, 28) or flattened (N, 784) pixels in [0, 1] -> float32 tensor (N, 1, 28, 28)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32) if not torch.is_tensor(images) else images)
    x = x.float()
    if x.dim() == 2:
        x = x.reshape(len(x), 1, preprocessing.IMAGE_SIDE, preprocessing.IMAGE_SIDE)
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (N, 1, 28, 28) or (N, 784), got {tuple(x.shape)}")
    return x


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def extract_features(backbone: CNNBackbone, images, batch_size: int = 512, device: str = "cpu",
                     precision: str = "fp32", channels_last: bool = False) -> np.ndarray:
    """Features of `images` (N, 1, 28, 28) in [0, 1] with the backbone in eval mode -> (N, feature_dim) float32.

    The backbone is left in eval mode on `device`.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    x_all = _as_images(images)
    backbone.to(device).eval()
    out = np.empty((len(x_all), backbone.feature_dim), dtype=np.float32)
    with torch.no_grad(), _autocast(device, precision):
        for start in range(0, len(x_all), batch_size):
            x = x_all[start:start + batch_size].to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out[start:start + len(x)] = backbone(x).float().cpu().numpy()
    return out


def mean_softmax_logits(logits_a: np.ndarray, logits_b: np.ndarray) -> np.ndarray:
    """Logits whose softmax is the mean of softmax(logits_a) and softmax(logits_b): log of the mean
    probabilities, computed stably (used to average an image's and its mirror's predictions)."""
    def log_softmax(z):
        z = np.asarray(z, np.float64)
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return np.logaddexp(log_softmax(logits_a), log_softmax(logits_b)) - np.log(2.0)


class CNNClassifier:
    """The trained pair: a torch backbone and the numpy MLP head that classifies its features."""

    def __init__(self, backbone: CNNBackbone, head: mlp_scratch.MLP, config: CNNConfig | None = None):
        self.backbone, self.head = backbone, head
        self.config = config if config is not None else CNNConfig()

    @property
    def n_params(self) -> int:
        return self.backbone.n_params + int(self.head.n_params)

    def features(self, images, batch_size: int = 512) -> np.ndarray:
        device = next(self.backbone.parameters()).device
        return extract_features(self.backbone, images, batch_size, device, self.config.precision,
                                self.config.channels_last)

    def logits(self, images, batch_size: int = 512) -> np.ndarray:
        """(N, 10) logits; with config.tta, those of the mean softmax over each image and its mirror."""
        x = _as_images(images)
        with single_threaded_blas():
            z = self.head.forward(self.features(x, batch_size), train=False)
            if not self.config.tta:
                return z
            z_mirror = self.head.forward(self.features(x.flip(3), batch_size), train=False)
            return mean_softmax_logits(z, z_mirror).astype(np.float32)

    def predict_proba(self, images, batch_size: int = 512) -> np.ndarray:
        z = self.logits(images, batch_size).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)  # (N, 10)

    def predict(self, images, batch_size: int = 512) -> np.ndarray:
        return self.logits(images, batch_size).argmax(axis=1)  # (N,) class ids

    def save(self, path) -> Path:
        """Write a checkpoint DIRECTORY `path` (created if needed) holding three files:
        backbone.pt (the backbone's state_dict, tensors only), head.npz (MLP.save) and config.json
        ({"arch": backbone constructor args, "config": CNNConfig.to_dict(), "feature_dim": int}).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()}
        torch.save(state, path / "backbone.pt")
        self.head.save(str(path / "head.npz"))
        meta = {"arch": self.backbone.arch(), "config": self.config.to_dict(),
                "feature_dim": self.backbone.feature_dim}
        (path / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        return path


def load_classifier(path) -> CNNClassifier:
    """Rebuild a classifier saved by CNNClassifier.save(path) (a directory); weights load on the CPU."""
    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    backbone = CNNBackbone(**meta["arch"])
    state = torch.load(path / "backbone.pt", map_location="cpu", weights_only=True)
    backbone.load_state_dict(state)
    backbone.eval()
    head_file = path / "head.npz"
    head = mlp_scratch.MLP.load(str(head_file))
    config = CNNConfig(**{k: v for k, v in meta["config"].items() if k in {f.name for f in fields(CNNConfig)}})
    config.device = "cpu"
    if config.channels_last:  # as in training, so that the same kernels give bit-identical outputs
        backbone = backbone.to(memory_format=torch.channels_last)
    return CNNClassifier(backbone, head, config)


def evaluate_classifier(clf: CNNClassifier, images, y) -> dict:
    """{"loss": mean cross-entropy, "acc": accuracy} of the classifier on images (N, 1, 28, 28)."""
    logits = clf.logits(images)
    y = np.asarray(y, dtype=np.int64)
    loss, _ = mlp_scratch.softmax_cross_entropy(logits, y)
    return {"loss": float(loss), "acc": float((logits.argmax(axis=1) == y).mean())}


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
@dataclass
class CNNTrainResult:
    classifier: CNNClassifier
    # per epoch: epoch, lr, train_loss, train_acc, val_loss, val_acc, seconds (train + validation), as
    # mlp_scratch's; plus train_seconds (the training pass alone) and phase ("joint" | "backbone" | "head")
    history: list[dict]
    best_epoch: int
    epochs_run: int
    diverged: bool
    seconds: float
    device: str
    n_params: int        # backbone + head


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop after zero padding by `pad` pixels, and a horizontal flip with probability 1/2.

    One gather for the whole batch (no per-image Python loop): x (B, C, H, W) -> (B, C, H, W).
    """
    B, C, H, W = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))                                  # (B, C, H+2p, W+2p), zeros = black
    oy = torch.randint(0, 2 * pad + 1, (B, 1), generator=gen, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (B, 1), generator=gen, device=dev)
    rows = (oy + torch.arange(H, device=dev))[:, :, None]                   # (B, H, 1)
    cols = (ox + torch.arange(W, device=dev))[:, None, :]                   # (B, 1, W)
    batch = torch.arange(B, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]                      # (B, H, W, C)
    flip = torch.rand(B, generator=gen, device=dev) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(2), out)
    # clone, not contiguous(): with C == 1 the permuted view already counts as contiguous but has NHWC
    # strides, which would silently switch the convolutions' memory format (config.channels_last decides).
    return out.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)  # (B, C, H, W)


def erase_batch(x: torch.Tensor, gen: torch.Generator, prob: float, min_side: int = 4,
                max_side: int = 16) -> torch.Tensor:
    """Random erasing (Zhong et al., 2017) with zeros: with probability `prob` an image gets one rectangle of
    random height and width in [min_side, max_side] pixels (2-33% of a 28x28 image, aspect 1:4 to 4:1) set to
    black, the background colour. One mask for the whole batch: x (B, C, H, W) -> (B, C, H, W)."""
    B, C, H, W = x.shape
    dev = x.device
    h = torch.randint(min_side, max_side + 1, (B, 1, 1), generator=gen, device=dev)
    w = torch.randint(min_side, max_side + 1, (B, 1, 1), generator=gen, device=dev)
    top = (torch.rand(B, 1, 1, generator=gen, device=dev) * (H - h + 1)).long()
    left = (torch.rand(B, 1, 1, generator=gen, device=dev) * (W - w + 1)).long()
    rows = torch.arange(H, device=dev)[None, :, None]                        # (1, H, 1)
    cols = torch.arange(W, device=dev)[None, None, :]                        # (1, 1, W)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # (B, H, W)
    chosen = torch.rand(B, 1, 1, generator=gen, device=dev) < prob
    return x.masked_fill((inside & chosen)[:, None], 0.0)


def lr_factor(schedule: str, step: int, total_steps: int, warmup_frac: float = 0.25) -> float:
    """Multiplier of the peak learning rate at `step` (0-based) of `total_steps`.

    onecycle: linear warm-up from 1/25 of the peak over the first 25% of the steps (lets BN statistics and
    Adam's moments settle at a high peak rate), then cosine down to ~0. cosine: cosine from 1 down to ~0.
    """
    t = step / max(1, total_steps)
    if schedule == "onecycle":
        if t < warmup_frac:
            return 0.04 + 0.96 * t / warmup_frac
        t = (t - warmup_frac) / (1.0 - warmup_frac)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def make_torch_optimizer(config: CNNConfig, params: list[tuple[str, nn.Parameter]], lr: float):
    """Weight decay on conv / linear weights only: decaying biases and BN scales only hurts."""
    decay = [p for n, p in params if p.ndim > 1]
    no_decay = [p for n, p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)  # as mlp_scratch's "sgd"
    if config.optimizer == "adam":
        # Adam's weight decay is the coupled L2 kind; AdamW's is decoupled.
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


class _Snapshot:
    """The best weights so far: backbone state_dict and head params, copied (restored at the end)."""

    def __init__(self):
        self.backbone, self.head, self.val_acc, self.epoch = None, None, -1.0, 0

    def take(self, backbone: nn.Module, head, val_acc: float, epoch: int) -> None:
        self.backbone = copy.deepcopy(backbone.state_dict())
        self.head = copy.deepcopy(head.state_dict()) if isinstance(head, nn.Module) else head.state()
        self.val_acc, self.epoch = val_acc, epoch

    def restore(self, backbone: nn.Module, head) -> None:
        backbone.load_state_dict(self.backbone)
        if isinstance(head, nn.Module):
            head.load_state_dict(self.head)
        else:
            head.load_state(self.head)


def _eval_torch(backbone: CNNBackbone, head, X: torch.Tensor, y: np.ndarray, config: CNNConfig,
                device: torch.device, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy with a numpy MLP head or a torch linear head, eval mode."""
    backbone.eval()

    def logits_of(images: torch.Tensor) -> np.ndarray:
        out = []
        with torch.no_grad(), _autocast(device, config.precision):
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size]
                if config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                f = backbone(x).float()
                if isinstance(head, nn.Module):
                    out.append(head(f).float().cpu().numpy())
                else:
                    out.append(head.forward(f.cpu().numpy(), train=False))
        return np.concatenate(out)

    z = logits_of(X)
    if config.tta:
        z = mean_softmax_logits(z, logits_of(X.flip(3)))
    z = z.astype(np.float32)
    loss, _ = mlp_scratch.softmax_cross_entropy(z, y)
    return float(loss), float((z.argmax(axis=1) == y).mean())


def joint_backward(backbone: CNNBackbone, head: mlp_scratch.MLP, x: torch.Tensor, y: np.ndarray,
                   precision: str = "fp32", label_smoothing: float = 0.0) -> tuple[float, np.ndarray]:
    """Forward and backward through the gradient bridge; fills backbone .grad and head.grads.

    torch computes the features; the numpy MLP computes the logits, the loss and dL/dfeatures by hand;
    features.backward(dL/dfeatures) then continues the chain rule into the backbone exactly as if the head
    were a torch module. Returns (loss, logits (B, 10)).
    """
    with _autocast(x.device, precision):
        features = backbone(x).float()                                  # (B, F), autograd graph kept
    logits = head.forward(features.detach().cpu().numpy(), train=True)  # (B, 10) numpy
    loss, dlogits = mlp_scratch.softmax_cross_entropy(logits, y, label_smoothing)
    dfeatures = head.backward(dlogits)                                  # (B, F) numpy; fills head.grads
    backbone.zero_grad(set_to_none=True)
    features.backward(torch.from_numpy(np.ascontiguousarray(dfeatures, dtype=np.float32)).to(x.device))
    return loss, logits


def joint_step(backbone: CNNBackbone, head: mlp_scratch.MLP, x: torch.Tensor, y: np.ndarray,
               optimizer: torch.optim.Optimizer, head_optimizer, precision: str = "fp32",
               label_smoothing: float = 0.0) -> tuple[float, np.ndarray]:
    """One joint training step: joint_backward, then the torch optimizer steps the backbone and the scratch
    optimizer steps the head. Returns (loss, logits)."""
    loss, logits = joint_backward(backbone, head, x, y, precision, label_smoothing)
    optimizer.step()
    head_optimizer.step(head.params, head.grads)
    return loss, logits


def _stop_line(log, message):
    if log is not None:
        log(message)


def _fit(config: CNNConfig, backbone: CNNBackbone, head, data: dict, device: torch.device, *,
         progress: bool, log: Callable[[str], None] | None, phase: str) -> dict:
    """The epoch loop shared by joint training (numpy MLP head) and frozen mode's first phase (torch head).

    Returns {"history", "best_epoch", "epochs_run", "diverged"}; the best weights are restored.
    """
    from tqdm.auto import tqdm

    torch_head = isinstance(head, nn.Module)
    params = list(backbone.named_parameters()) + (list(head.named_parameters()) if torch_head else [])
    optimizer = make_torch_optimizer(config, params, config.lr)
    head_optimizer = None
    if not torch_head:
        head_optimizer = mlp_scratch.make_optimizer(config.optimizer, config.head_lr, config.momentum,
                                                    config.weight_decay)
    X, y, X_val, y_val = data["X"], data["y"], data["X_val"], data["y_val"]
    y_t = torch.from_numpy(y).to(device)
    n = len(X)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    gen = torch.Generator(device=device)
    gen.manual_seed(config.seed)
    shuffle_gen = torch.Generator()  # permutations on the CPU: identical order on every device
    shuffle_gen.manual_seed(config.seed + 1)

    best = _Snapshot()
    best.take(backbone, head, -1.0, 0)
    history, diverged, bad_epochs, step = [], False, 0, 0
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        epoch_lr = config.lr * lr_factor(config.schedule, step, total_steps)  # at the epoch's start, as mlp_scratch
        backbone.train()
        if torch_head:
            head.train()
        order = torch.randperm(n, generator=shuffle_gen).to(device)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{config.epochs}", leave=False,
                   disable=not progress, dynamic_ncols=True)
        for b in bar:
            lr_now = lr_factor(config.schedule, step, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = config.lr * lr_now
            if head_optimizer is not None:
                head_optimizer.lr = config.head_lr * lr_now
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            x = X[idx]
            if config.augment:
                x = augment_batch(x, gen)
            if config.erase:
                x = erase_batch(x, gen, config.erase)
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if torch_head:
                with _autocast(device, config.precision):
                    logits_t = head(backbone(x).float()).float()
                    loss_t = F.cross_entropy(logits_t, y_t[idx], label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss_t.backward()
                optimizer.step()
                loss = loss_t.item()
                batch_correct = int((logits_t.argmax(1) == y_t[idx]).sum())
            else:
                yb = y[idx.cpu().numpy()]
                loss, logits = joint_step(backbone, head, x, yb, optimizer, head_optimizer, config.precision,
                                          config.label_smoothing)
                batch_correct = int((logits.argmax(axis=1) == yb).sum())
            step += 1
            if not math.isfinite(loss):
                diverged = True
                break
            loss_sum += loss * len(idx)
            correct += batch_correct
            seen += len(idx)
            if progress and b % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        bar.close()
        train_seconds = time.perf_counter() - t0
        if diverged:
            _stop_line(log, f"epoch {epoch}: the loss is not finite -- diverged; best weights so far restored")
            break
        val_loss, val_acc = _eval_torch(backbone, head, X_val, y_val, config, device)
        if not math.isfinite(val_loss):
            diverged = True
            _stop_line(log, f"epoch {epoch}: validation loss not finite -- diverged; best weights restored")
            break
        row = {"epoch": epoch, "lr": epoch_lr,
               "train_loss": loss_sum / seen, "train_acc": correct / seen, "val_loss": val_loss,
               "val_acc": val_acc, "seconds": time.perf_counter() - t0, "train_seconds": train_seconds,
               "phase": phase}
        history.append(row)
        _stop_line(log, f"[{phase}] epoch {epoch:3d}/{config.epochs}  lr {row['lr']:.2e}  "
                        f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                        f"val loss {val_loss:.4f} acc {val_acc:.4f}  {row['seconds']:.1f}s")
        if val_acc > best.val_acc:
            best.take(backbone, head, val_acc, epoch)
            bad_epochs = 0
        else:
            bad_epochs += 1
            if config.patience and bad_epochs >= config.patience:
                _stop_line(log, f"early stop: no val improvement for {config.patience} epochs "
                                f"(best {best.val_acc:.4f} at epoch {best.epoch})")
                break
    best.restore(backbone, head)
    return {"history": history, "best_epoch": best.epoch, "epochs_run": len(history), "diverged": diverged}


def train(config: CNNConfig, splits: Splits, *, progress: bool = False,
          log: Callable[[str], None] | None = None) -> CNNTrainResult:
    """Train backbone + scratch MLP head on splits.X_train, early-stopping on splits.X_val.

    `config.subset` (if set) trains on a stratified subset of that many images; val (and test) stay whole.
    Never raises for a diverging run: it returns diverged=True with the best weights so far.
    """
    config.validate()
    with single_threaded_blas():
        return _train(config, splits, progress=progress, log=log)


def _train(config: CNNConfig, splits: Splits, *, progress: bool, log) -> CNNTrainResult:
    t_start = time.perf_counter()
    if config.subset is not None and config.subset < len(splits.y_train):
        splits = splits.subset(config.subset, None, seed=config.seed)
    device = resolve_device(config.device)
    mean, std = preprocessing.standardization_stats(splits.X_train)
    backbone = build_backbone(config, mean, std).to(device)
    if config.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    # The whole dataset as tensors on the device: indexing a tensor per batch costs far less than a
    # DataLoader's per-sample collation on a CPU.
    data = {"X": _as_images(preprocessing.to_images(splits.X_train)).to(device),
            "y": np.ascontiguousarray(splits.y_train, dtype=np.int64),
            "X_val": _as_images(preprocessing.to_images(splits.X_val)).to(device),
            "y_val": np.ascontiguousarray(splits.y_val, dtype=np.int64)}

    if config.head_mode == "joint":
        head = build_head(config, backbone.feature_dim)
        fit = _fit(config, backbone, head, data, device, progress=progress, log=log, phase="joint")
        history = fit["history"]
    else:
        torch.manual_seed(config.seed + 7)
        linear = nn.Linear(backbone.feature_dim, NUM_CLASSES).to(device)  # temporary, discarded afterwards
        fit = _fit(config, backbone, linear, data, device, progress=progress, log=log, phase="backbone")
        history = fit["history"]
        head = build_head(config, backbone.feature_dim)
        if not fit["diverged"]:
            F_train = extract_features(backbone, data["X"], 1024, device, config.precision, config.channels_last)
            F_val = extract_features(backbone, data["X_val"], 1024, device, config.precision,
                                     config.channels_last)
            mlp_config = mlp_scratch.MLPConfig(
                hidden=list(config.head_hidden), activation=config.head_activation, dropout=config.head_dropout,
                init="he", optimizer=config.optimizer, lr=config.head_lr, momentum=config.momentum,
                weight_decay=config.weight_decay, schedule="cosine", warmup_epochs=0.0,
                epochs=config.head_epochs, batch_size=config.batch_size, patience=config.patience,
                standardize=True, seed=config.seed, subset=None)
            head_result = mlp_scratch.train(mlp_config, F_train, data["y"], F_val, data["y_val"],
                                            progress=progress, log=log)
            head = head_result.model
            offset = len(history)
            for row in head_result.history:
                history.append({**row, "epoch": offset + row["epoch"], "phase": "head"})
            fit["diverged"] = bool(head_result.diverged)
            fit["epochs_run"] = offset + head_result.epochs_run
            fit["best_epoch"] = offset + head_result.best_epoch

    backbone.eval()
    classifier = CNNClassifier(backbone, head, config)
    return CNNTrainResult(classifier=classifier, history=history, best_epoch=fit["best_epoch"],
                          epochs_run=fit["epochs_run"], diverged=fit["diverged"],
                          seconds=time.perf_counter() - t_start, device=str(device),
                          n_params=classifier.n_params)


# ----------------------------------------------------------------------------------------------------------
# Layer statistics at initialisation (for the init study)
# ----------------------------------------------------------------------------------------------------------
def init_statistics(config: CNNConfig, images, y) -> list[dict]:
    """Per conv layer at initialisation, after one forward + backward (through the scratch head) on `images`:
    {"layer": 1..5, "act_mean", "act_std" (of the post-ReLU activations), "dead_frac" (fraction of
    units -- channel x position -- that are <= 0 for every image), "grad_norm" (||dL/dW_conv||_F)}.
    """
    x = _as_images(images)
    y = np.asarray(y, dtype=np.int64)
    mean, std = preprocessing.standardization_stats(x.numpy().reshape(len(x), -1))
    cfg = copy.copy(config)
    backbone = build_backbone(cfg, mean, std)
    head = build_head(cfg, backbone.feature_dim)
    backbone.train()
    acts: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: acts.append(out.detach()))
             for m in backbone.layers if isinstance(m, nn.ReLU)]
    try:
        joint_backward(backbone, head, x, y)
    finally:
        for h in hooks:
            h.remove()
    convs = [m for m in backbone.layers if isinstance(m, nn.Conv2d)]
    rows = []
    for i, (a, conv) in enumerate(zip(acts, convs), start=1):
        rows.append({"layer": i, "act_mean": float(a.mean()), "act_std": float(a.std()),
                     "dead_frac": float((a <= 0).all(dim=0).float().mean()),
                     "grad_norm": float(conv.weight.grad.norm())})
    return rows


# ----------------------------------------------------------------------------------------------------------
# The README table
# ----------------------------------------------------------------------------------------------------------
def describe(config: CNNConfig | None = None) -> str:
    """Markdown table: for each pooling variant of `config`, feature size and parameter counts."""
    config = config or CNNConfig()
    lines = [f"Filters {parse_filters(config.filters, config.base_filters)}, kernel {config.kernel_size}, "
             f"BatchNorm {'on' if config.batchnorm else 'off'}, head hidden {list(config.head_hidden)}:", "",
             "| pool | downsampling (2 sites) | final site | feature map | feature_dim | backbone params "
             "| head params | total params | conv MMACs/image |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for pool in POOLS:
        b = CNNBackbone(config.filters, config.kernel_size, pool, config.init, 1, config.batchnorm,
                        config.base_filters)
        dims = [b.feature_dim] + list(config.head_hidden) + [NUM_CLASSES]
        head_params = sum(i * o + o for i, o in zip(dims[:-1], dims[1:]))
        final = {"max": "2x2 max", "avg": "2x2 avg", "gap": "global avg"}[pool]
        down = "2x2 avg" if pool == "avg" else "2x2 max"
        side = int(round(math.sqrt(b.feature_dim / b.channels[-1])))
        lines.append(f"| {pool} | {down} | {final} | {b.channels[-1]}x{side}x{side} | {b.feature_dim} | "
                     f"{b.n_params:,} | {head_params:,} | {b.n_params + head_params:,} | "
                     f"{b.conv_macs() / 1e6:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = CNNConfig()
    p = argparse.ArgumentParser(description="Train the 5-conv CNN backbone with the scratch MLP head "
                                            "(Fashion-MNIST, assignment Q3). Defaults = the chosen configuration.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--filters", default=d.filters, help="'constant', 'double' or five comma-separated counts")
    a("--base-filters", type=int, default=d.base_filters, help="first-layer count for constant/double")
    a("--kernel-size", type=int, default=d.kernel_size, choices=KERNELS, help="convolution kernel size")
    a("--pool", default=d.pool, choices=POOLS, help="pooling variant (see the module docstring)")
    a("--init", default=d.init, choices=INITS, help="conv weight initialisation")
    a("--batchnorm", action=argparse.BooleanOptionalAction, default=d.batchnorm,
      help="BatchNorm between each conv and its ReLU")
    a("--head-mode", default=d.head_mode, choices=HEAD_MODES, help="joint (through the MLP) or frozen features")
    a("--head-hidden", type=int, nargs="*", default=d.head_hidden, help="scratch MLP hidden widths")
    a("--head-activation", default=d.head_activation, help="scratch MLP activation")
    a("--head-dropout", type=float, default=d.head_dropout, help="scratch MLP drop probability")
    a("--head-epochs", type=int, default=d.head_epochs, help="frozen mode: MLP epochs on the features")
    a("--optimizer", default=d.optimizer, choices=OPTIMIZERS, help="optimizer of backbone and head")
    a("--lr", type=float, default=d.lr, help="peak backbone learning rate")
    a("--head-lr", type=float, default=d.head_lr, help="peak head learning rate")
    a("--momentum", type=float, default=d.momentum, help="SGD momentum")
    a("--weight-decay", type=float, default=d.weight_decay, help="weight decay (weights only)")
    a("--schedule", default=d.schedule, choices=SCHEDULES, help="learning-rate schedule")
    a("--epochs", type=int, default=d.epochs, help="training epochs")
    a("--batch-size", type=int, default=d.batch_size, help="mini-batch size")
    a("--augment", action=argparse.BooleanOptionalAction, default=d.augment,
      help="random crop (pad 2) + horizontal flip")
    a("--erase", type=float, default=d.erase, help="probability of random erasing per training image")
    a("--label-smoothing", type=float, default=d.label_smoothing, help="label smoothing of the training loss")
    a("--tta", action=argparse.BooleanOptionalAction, default=d.tta,
      help="predict with the mean softmax of each image and its mirror image")
    a("--patience", type=int, default=d.patience, help="early-stopping patience in epochs (0 = off)")
    a("--precision", default=d.precision, choices=PRECISIONS, help="backbone compute precision")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=d.channels_last,
      help="NHWC memory format")
    a("--seed", type=int, default=d.seed, help="random seed (weights, shuffling, augmentation, dropout)")
    a("--subset", type=int, default=d.subset, help="train on this many images (stratified); val/test whole")
    a("--device", default=d.device, help="auto, cpu, cuda[:i] or mps")
    a("--data-dir", default=None, help="folder with the Fashion-MNIST files (see preprocessing.py)")
    a("--save", default=None, help="write the trained classifier to this directory")
    a("--json", default=None, help="write final metrics and the full config to this JSON file")
    a("--no-progress", action="store_true", help="no progress bar (the per-epoch lines remain)")
    a("--describe", action="store_true", help="print the pooling-variant table and exit")
    return p


def config_from_args(args: argparse.Namespace) -> CNNConfig:
    names = {f.name for f in fields(CNNConfig)}
    return CNNConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args)
    try:
        config.validate()
    except ValueError as e:
        parser.error(str(e))
    if args.describe:
        print(describe(config))
        return 0
    print("config:", json.dumps(config.to_dict()))
    try:
        splits = preprocessing.load_splits(args.data_dir)
    except preprocessing.DataError as e:
        parser.exit(1, f"cnn_torch.py: error: {e}\n")
    result = train(config, splits, progress=not args.no_progress, log=print)
    clf = result.classifier
    val = evaluate_classifier(clf, preprocessing.to_images(splits.X_val), splits.y_val)
    test = evaluate_classifier(clf, preprocessing.to_images(splits.X_test), splits.y_test)
    status = " (DIVERGED)" if result.diverged else ""
    print(f"done{status}: {result.epochs_run} epochs in {result.seconds:.1f}s on {result.device}, best epoch "
          f"{result.best_epoch}; val acc {val['acc']:.4f}  test acc {test['acc']:.4f}  "
          f"({result.n_params:,} parameters)")
    if args.save:
        print("saved to", clf.save(args.save))
    if args.json:
        out = {"config": config.to_dict(), "val": val, "test": test, "epochs_run": result.epochs_run,
               "best_epoch": result.best_epoch, "diverged": result.diverged, "seconds": result.seconds,
               "device": result.device, "n_params": result.n_params, "history": result.history}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
