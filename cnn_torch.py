"""A five-convolution PyTorch backbone whose features feed the scratch MLP of question 2 (assignment Q3).

    python cnn_torch.py                      # train the chosen configuration (CNNConfig's defaults)
    python cnn_torch.py --pool avg --kernel-size 5 --filters double --base-filters 16 --epochs 5
    python cnn_torch.py --head-mode joint    # train backbone and scratch MLP together through the bridge
    python cnn_torch.py --describe           # the per-pooling-variant table of the README

Architecture (Q3a-c). Five 'same'-padded convolutions, each immediately followed by a ReLU (an optional
BatchNorm sits between a convolution and its ReLU), in three stages with a pooling site after each:

    stage 1 (28x28): conv1 -> ReLU -> conv2 -> ReLU -> POOL 2x2       -> 14x14
    stage 2 (14x14): conv3 -> ReLU -> conv4 -> ReLU -> POOL 2x2       ->  7x7
    stage 3 ( 7x7):  conv5 -> ReLU                  -> FINAL POOL     ->  3x3 (max, avg) or 1x1 (gap)
    flatten -> features (N, feature_dim) -> scratch MLP head (mlp_scratch.MLP) -> 10 logits

How `pool` fills the three sites; the convolutions, their spatial sizes and hence their compute are the same
in all three variants, only the pooling differs:

    pool="max": 2x2 max pooling at all three sites; feature_dim = C5 * 3 * 3
    pool="avg": 2x2 average pooling at all three sites; feature_dim = C5 * 3 * 3
    pool="gap": 2x2 max pooling between the stages (as "max") and global average pooling at the final
                site; feature_dim = C5. "max" vs "avg" compares the downsampling operator, "max" vs "gap"
                compares how the last feature map becomes a vector (a coarse 3x3 layout vs its average).

Filters: "constant" (base_filters in every layer), "double" (base_filters * 2**i for layer i) or an
explicit list of five counts such as "32,32,64,64,128" (base_filters is then unused). Kernel sizes 1, 3, 5, 7.
The convolution weights are drawn as the MLP's are, by mlp_scratch.init_std ("random", "xavier", "he"), with
fan_in = C_in * k * k and fan_out = C_out * k * k; biases start at zero, and under BatchNorm there are none
(BatchNorm's shift replaces them).

The classifier (Q3d) is the numpy MLP of question 2; its features cross from torch in `forward_backward`, the
bridge: torch computes the features, the head computes the loss and dL/dfeatures, and
features.backward(dL/dfeatures) carries the chain rule back into the backbone. Two heads answer that call:
  - head_mode="joint": ScratchHead, the scratch MLP itself (numpy forward, softmax_cross_entropy, numpy
    backward), trained together with the backbone: a torch optimizer steps the backbone, mlp_scratch's the MLP.
  - head_mode="frozen": LinearHead, a temporary torch nn.Linear that trains the backbone and is then
    discarded; the backbone's eval-mode features are extracted once and mlp_scratch.train fits the MLP on them.

Input standardisation (global mean/std of the training pixels) happens inside the backbone and is saved
with it, so a saved classifier takes images scaled to [0, 1] (anything else is refused with a ValueError).
How the defaults were chosen, and what they reach, is in the README and the report.
"""

import argparse
import copy
import io
import json
import math
import pickle
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import cli
import mlp_scratch
import preprocessing
from preprocessing import IMAGE_SIDE, INPUT_DIM, NUM_CLASSES, Splits

POOLS = ("max", "avg", "gap")
KERNELS = (1, 3, 5, 7)  # odd, so that 'same' padding is k // 2 on every side
INITS = ("random", "xavier", "he")  # formulas: mlp_scratch.init_std (one for both models); the study's order
HEAD_MODES = ("joint", "frozen")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 where the device computes it natively, else fp32
MAX_FILTERS = 2048  # caps on sizes turn absurd values into one-line errors, not an out-of-memory crash later
VAL_BATCH, PREDICT_BATCH = 1024, 512  # images per forward pass when validating / predicting (results depend on it)
CHECKPOINT_FILES = ("backbone.pt", "head.npz", "config.json")
IMAGES_MESSAGE = (f"expected floating-point images of shape (N, 1, {IMAGE_SIDE}, {IMAGE_SIDE}), (N, {IMAGE_SIDE}, "
                  f"{IMAGE_SIDE}) or (N, {INPUT_DIM}) with finite pixels in [0, 1]; got {{}}. Scale pixels to "
                  f"[0, 1]: divide uint8 images by 255")
ONECYCLE_WARMUP = 0.25  # "onecycle" = "cosine" after a linear warm-up over this fraction of the steps
OOM_HINT = "; use fewer or narrower --filters or --head-hidden layers, or a smaller --batch-size"


# ----------------------------------------------------------------------------------------------------------
# Configuration: each field states its default, its flag's help and what is valid once (cli.flag, as
# MLPConfig does; the rules both share are cli's and mlp_scratch's); the defaults are the chosen configuration.
# ----------------------------------------------------------------------------------------------------------
TEXT = (lambda v: isinstance(v, str), "a string")  # filters and device: validate() parses them


@dataclass
class CNNConfig:
    """One run's hyperparameters, each a flag of `python cnn_torch.py` (its default, help and rule stated once,
    by cli.flag); the head's rules are MLPConfig's. The defaults are the chosen configuration."""
    filters: str = cli.flag("32,32,64,64,128", "'constant', 'double' or five comma-separated counts", TEXT)
    base_filters: int = cli.flag(32, "count of constant / double (double: base * 2**i)", cli.integer(1, MAX_FILTERS))
    kernel_size: int = cli.flag(3, "convolution kernel size, 'same' padding",
                                (lambda v: cli.is_int(v) and v in KERNELS, f"one of {KERNELS}"), choices=KERNELS)
    pool: str = cli.flag("max", "pooling variant (see the module docstring)", choices=POOLS)
    init: str = cli.flag("xavier", "conv weight initialisation (mlp_scratch.init_std)", choices=INITS)
    batchnorm: bool = cli.flag(True, "BatchNorm between each conv and its ReLU", cli.BOOL)
    head_mode: str = cli.flag("frozen", "joint: through the MLP head; frozen: MLP on fixed features",
                              choices=HEAD_MODES)
    head_hidden: list[int] = cli.flag([256], "scratch MLP hidden widths", mlp_scratch.WIDTHS, type=int, nargs="*")
    head_activation: str = cli.flag("gelu", "scratch MLP activation", choices=mlp_scratch.ACTIVATIONS)
    head_dropout: float = cli.flag(0.3, "scratch MLP drop probability after each hidden layer", cli.BELOW_ONE)
    head_epochs: int = cli.flag(10, "frozen mode: epochs of mlp_scratch.train on the features", mlp_scratch.EPOCHS)
    # the names mlp_scratch.make_optimizer knows too: the head steps with the same kind
    optimizer: str = cli.flag("adamw", "optimizer of backbone and head (sgd: momentum)",
                              choices=("adamw", "adam", "sgd"))
    lr: float = cli.flag(4e-3, "peak backbone learning rate", cli.POSITIVE)
    head_lr: float = cli.flag(1e-3, "peak head learning rate", cli.POSITIVE)
    momentum: float = cli.flag(0.9, "SGD momentum", cli.BELOW_ONE)
    weight_decay: float = cli.flag(5e-2, "decay of conv / head weights (decoupled in AdamW)", cli.NON_NEGATIVE)
    schedule: str = cli.flag("onecycle", "onecycle (cosine after a warm-up) or cosine", choices=("onecycle", "cosine"))
    epochs: int = cli.flag(10, "training epochs", mlp_scratch.EPOCHS)
    batch_size: int = cli.flag(256, "mini-batch size", cli.integer(1, 65536))
    augment: bool = cli.flag(True, "random crop (zero padding 2) + horizontal flip", cli.BOOL)
    erase: float = cli.flag(0.5, "probability of a random rectangle zeroed",
                            cli.number(lambda v: 0 <= v <= 1, "in [0, 1]"))
    label_smoothing: float = cli.flag(0.1, "target (1 - e) * onehot + e / 10 (backbone, joint head)", cli.BELOW_ONE)
    tta: bool = cli.flag(True, "predict with the mean softmax of each image and its mirror image", cli.BOOL)
    ema: float = cli.flag(0.25, "frozen mode: average the backbone's weights over about this fraction of the "
                          "steps, exponentially (0: off)", cli.BELOW_ONE)
    patience: int = cli.flag(0, "stop after this many epochs without a better val acc (0: off)", mlp_scratch.PATIENCE)
    precision: str = cli.flag("auto", "backbone precision (bf16 autocast); auto: bf16 where native", choices=PRECISIONS)
    channels_last: bool = cli.flag(True, "NHWC memory format", cli.BOOL)
    seed: int = cli.flag(0, "random seed (weights, order, augmentation, dropout)", cli.SEED, type=cli.seed_arg)
    subset: int | None = cli.flag(None, "train on N images (stratified; val, test whole)", mlp_scratch.SUBSET, type=int)
    device: str = cli.flag("auto", "auto (cuda, then mps, then cpu), cpu, cuda[:i] or mps", TEXT)

    to_dict = asdict  # config.to_dict(): its fields as a dict

    def validate(self) -> "CNNConfig":
        """Returns self, or raises ValueError("<field>: <what is wrong>") on the first invalid field."""
        cli.check_fields(self)  # each field's rule (metadata["valid"])
        parse_filters(self.filters, self.base_filters)
        resolve_device(self.device)
        return self


CONFIG_FIELDS = {f.name for f in fields(CNNConfig)}


def parse_filters(filters: str, base_filters: int = 32) -> list[int]:
    """The five per-layer filter counts of "constant", "double" or an explicit list; ValueError if invalid."""
    if filters in ("constant", "double"):
        counts = [base_filters * (2 ** i if filters == "double" else 1) for i in range(5)]
    else:
        try:
            counts = [int(c) for c in str(filters).split(",")]
        except ValueError:
            counts = []
    if len(counts) != 5 or min(counts) < 1 or max(counts) > MAX_FILTERS:
        raise ValueError(f"filters: must be 'constant', 'double' or 5 comma-separated counts in [1, {MAX_FILTERS}] "
                         f"such as 16,32,64,64,128; got {filters!r}")
    return counts


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda, then mps, then cpu; an explicit name must be available here."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(kind for kind, here in available.items() if here)
    if not re.fullmatch(r"(cpu|mps|cuda)(:\d+)?", name):
        raise ValueError(f"device: must be auto, cpu, cuda[:i] or mps, got {name!r}")
    if not available[kind := name.split(":")[0]]:
        raise ValueError(f"device: {name!r} requested but {kind.upper()} is not available here")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------------------
class CNNBackbone(nn.Module):
    """(N, 1, 28, 28) images in [0, 1] -> (N, feature_dim) features: five conv(+BN)+ReLU blocks and three
    pooling sites, as `config` (checked by CNNConfig.validate) says. The weights are drawn from torch's global
    RNG (build_backbone seeds it)."""

    def __init__(self, config: CNNConfig, input_mean: float = 0.0, input_std: float = 1.0):
        super().__init__()
        c1, c2, c3, c4, c5 = self.channels = parse_filters(config.filters, config.base_filters)
        self.kernel_size = k = config.kernel_size
        self.init, bn = config.init, config.batchnorm
        # Buffers, so that the standardisation travels with the state_dict and predict() takes [0, 1] pixels.
        self.register_buffer("input_mean", torch.tensor(float(input_mean)))
        self.register_buffer("input_std", torch.tensor(float(input_std)))

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            """'same'-padded conv -> (BatchNorm) -> ReLU; no conv bias under BatchNorm (its shift is one)."""
            conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=not bn)
            return [conv, nn.BatchNorm2d(c_out), nn.ReLU()] if bn else [conv, nn.ReLU()]

        down = nn.AvgPool2d if config.pool == "avg" else nn.MaxPool2d  # "gap" downsamples as "max" does
        final = nn.AdaptiveAvgPool2d(1) if config.pool == "gap" else down(2)
        # One flat Sequential: its state_dict keys (layers.0.weight, ...) are those of every saved checkpoint.
        self.layers = nn.Sequential(*block(1, c1), *block(c1, c2), down(2),   # stage 1: 28x28 -> 14x14
                                    *block(c2, c3), *block(c3, c4), down(2),  # stage 2: 14x14 -> 7x7
                                    *block(c4, c5), final, nn.Flatten())      # stage 3: 7x7 -> 3x3 (1x1 for "gap")
        self.feature_dim = c5 * (1 if config.pool == "gap" else (IMAGE_SIDE // 8) ** 2)
        # After building all five (each Conv2d draws torch's default init first): the same seed, the same weights.
        for conv in self.convs:
            fan_in, fan_out = conv.in_channels * k * k, conv.out_channels * k * k
            nn.init.normal_(conv.weight, 0.0, mlp_scratch.init_std(self.init, fan_in, fan_out))
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean) / self.input_std  # (N, 1, 28, 28), standardised
        return self.layers(x)                       # (N, feature_dim)

    @property
    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.layers if isinstance(m, nn.Conv2d)]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def conv_macs(self) -> int:
        """Multiply-adds of the five convolutions for one image (pooling and BN are negligible)."""
        sides = (IMAGE_SIDE, IMAGE_SIDE, IMAGE_SIDE // 2, IMAGE_SIDE // 2, IMAGE_SIDE // 4)
        return sum(side * side * conv.weight.numel() for side, conv in zip(sides, self.convs))


def build_backbone(config: CNNConfig, input_mean: float = 0.0, input_std: float = 1.0) -> CNNBackbone:
    torch.manual_seed(config.seed)  # the weights depend on the seed only
    return CNNBackbone(config, input_mean, input_std)


def build_head(config: CNNConfig, feature_dim: int) -> mlp_scratch.MLP:
    return mlp_scratch.MLP(feature_dim, list(config.head_hidden), NUM_CLASSES, activation=config.head_activation,
                           dropout=config.head_dropout, init="he", seed=config.seed)


# ----------------------------------------------------------------------------------------------------------
# The classifier: backbone + scratch MLP head
# ----------------------------------------------------------------------------------------------------------
def check_images(images) -> torch.Tensor:
    """(N, 1, 28, 28), (N, 28, 28) or (N, 784) floating-point pixels in [0, 1] -> float32 tensor (N, 1, 28, 28).

    Anything else (integers such as raw uint8 pixels, strings, None, NaN / inf, values outside [0, 1], other
    shapes) raises one ValueError saying what to do."""
    x = images if torch.is_tensor(images) else np.asarray(images)
    if not (x.is_floating_point() if torch.is_tensor(x) else x.dtype.kind == "f" and x.dtype.itemsize <= 8):
        raise ValueError(IMAGES_MESSAGE.format(f"{type(images).__name__} of dtype "
                                               f"{str(x.dtype).replace('torch.', '')}"))
    x = torch.as_tensor(x)
    if tuple(x.shape[1:]) not in ((1, IMAGE_SIDE, IMAGE_SIDE), (IMAGE_SIDE, IMAGE_SIDE), (INPUT_DIM,)):
        raise ValueError(IMAGES_MESSAGE.format(f"shape {tuple(x.shape)}"))
    # min() and max() propagate NaN, so this one test refuses NaN and inf as well as 0-255 pixels.
    if x.numel() and not (float(x.min()) >= 0.0 and float(x.max()) <= 1.0):
        raise ValueError(IMAGES_MESSAGE.format(f"pixels in [{float(x.min()):g}, {float(x.max()):g}]"))
    return x.float().reshape(len(x), 1, IMAGE_SIDE, IMAGE_SIDE)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where the device computes bf16 natively (a CUDA GPU that supports it, a CPU with
    AVX512-BF16 or AMX), else "fp32" (a T4, most laptops): emulated bf16 would be slower than fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_precision(precision, device) == "bf16")


def memory_format(config: CNNConfig) -> torch.memory_format:
    """What .to(memory_format=...) makes of a backbone's weights: NHWC with config.channels_last, else unchanged."""
    return torch.channels_last if config.channels_last else torch.preserve_format


def map_batches(backbone: CNNBackbone, fn: Callable, x: torch.Tensor, config: CNNConfig, batch_size: int, tta=False):
    """fn (a head's logits, or the features as numpy) of the eval-mode float32 features (B, feature_dim) of
    consecutive batches of checked images x (N, 1, 28, 28), outside autocast; the results concatenated. With
    `tta`, fn gives logits, and the result is the logits of the mean softmax of each image and its mirror.
    Every evaluation goes through here: validation during training and the classifier's predictions."""
    backbone.eval()
    device = next(backbone.parameters()).device

    def over_batches(images: torch.Tensor) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            xb = images[start:start + batch_size].to(device)
            if config.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), _autocast(device, config.precision):
                features = backbone(xb).float()
            out.append(fn(features))
        return np.concatenate(out) if out else fn(torch.zeros(0, backbone.feature_dim, device=device))

    z = over_batches(x)
    return mean_softmax_logits(z, over_batches(x.flip(3))).astype(np.float32) if tta else z


def mean_softmax_logits(logits_a: np.ndarray, logits_b: np.ndarray) -> np.ndarray:
    """Logits (N, C) whose softmax is the mean of softmax(logits_a) and softmax(logits_b), computed stably
    in log space (averages an image's and its mirror's predictions)."""
    log_a, log_b = (mlp_scratch.log_softmax(np.asarray(z, np.float64)) for z in (logits_a, logits_b))
    with np.errstate(invalid="ignore"):  # a diverged network's NaN logits stay NaN: its run is flagged, not warned
        return np.logaddexp(log_a, log_b) - np.log(2.0)


def scores(logits: np.ndarray, y) -> dict:
    """{"loss": mean cross-entropy, "acc": accuracy} of logits (N, 10), through the project's one loss
    (mlp_scratch.softmax_cross_entropy) on all the logits at once."""
    y = np.asarray(y, dtype=np.int64)
    loss, _ = mlp_scratch.softmax_cross_entropy(logits, y)
    return {"loss": float(loss), "acc": float((logits.argmax(axis=1) == y).mean())}


class CNNClassifier:
    """The trained pair: a torch backbone and the numpy MLP head that classifies its features."""

    def __init__(self, backbone: CNNBackbone, head: mlp_scratch.MLP, config: CNNConfig):
        self.backbone, self.head, self.config = backbone, head, config

    @property
    def n_params(self) -> int:
        return self.backbone.n_params + int(self.head.n_params)

    def features(self, images, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """(N, feature_dim) float32 features of images in [0, 1]."""
        return map_batches(self.backbone, lambda f: f.cpu().numpy(), check_images(images), self.config, batch_size)

    def logits(self, images, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """(N, 10) logits; with config.tta, those of the mean softmax over each image and its mirror."""
        with threadpool_limits(limits=1, user_api="blas"):
            return map_batches(self.backbone, lambda f: self.head.forward(f.cpu().numpy()), check_images(images),
                               self.config, batch_size, self.config.tta)

    def predict_proba(self, images, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        return mlp_scratch.softmax(self.logits(images, batch_size).astype(np.float64)).astype(np.float32)

    def predict(self, images, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        return self.logits(images, batch_size).argmax(axis=1)  # (N,) class ids

    def save(self, path) -> Path:
        """Write the checkpoint DIRECTORY `path` all at once (cli.atomic_folder: a full disk leaves the old
        folder, or none, never part of one): backbone.pt (the backbone's state_dict, tensors only), head.npz
        (the MLP's file) and config.json ({"config": CNNConfig.to_dict(), "feature_dim": int}). A folder
        holding anything but a checkpoint is refused."""
        if why := not_a_checkpoint_folder(path):
            raise ValueError(why)
        backbone = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in self.backbone.state_dict().items()}, backbone)
        meta = {"config": self.config.to_dict(), "feature_dim": self.backbone.feature_dim}
        return cli.atomic_folder(path, {"backbone.pt": backbone.getvalue(),
                                        "head.npz": mlp_scratch.model_bytes(self.head),
                                        "config.json": (json.dumps(meta, indent=2) + "\n").encode()})


def not_a_checkpoint_folder(path) -> str | None:
    """Why the folder `path` must not be replaced by a checkpoint (a file, or it holds other files), or None."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    others = sorted(p.name for p in path.iterdir() if p.name not in CHECKPOINT_FILES) if path.is_dir() else []
    return f"{path} holds other files ({', '.join(others[:3])}); save into a new folder" if others else None


def load_classifier(path) -> CNNClassifier:
    """Rebuild a classifier saved by CNNClassifier.save(path) (a directory); weights load on the CPU.
    Tensors only (torch.load(weights_only=True), np.load(allow_pickle=False)): a pickle is refused. A file
    that is missing, damaged, not of this code or holding NaN / infinite weights raises one ValueError naming it."""
    path = Path(path)
    if missing := [path / name for name in CHECKPOINT_FILES if not (path / name).is_file()]:
        raise ValueError(f"{missing[0]}: missing; {path} is not a checkpoint written by CNNClassifier.save")
    file = path / "config.json"
    try:
        saved = {k: v for k, v in json.loads(file.read_text())["config"].items() if k in CONFIG_FIELDS}
        config = CNNConfig(**{**saved, "device": "cpu"}).validate()
        backbone = CNNBackbone(config)
        file = path / "backbone.pt"
        backbone.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        why = (str(e).strip().splitlines() or [""])[0]  # torch's messages run to a dozen lines
        raise ValueError(f"{file}: not written by CNNClassifier.save ({e.__class__.__name__}: {why})") from None
    for name, tensor in backbone.state_dict().items():  # a NaN weight would predict one class for every image
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{file}: {name} holds NaN or infinite weights")
    head = mlp_scratch.load_model(path / "head.npz")
    if head.in_dim != backbone.feature_dim:
        raise ValueError(f"{path}: the head takes {head.in_dim} features, the backbone gives {backbone.feature_dim}")
    # the weights' memory format as in training, so that the same kernels give bit-identical outputs
    return CNNClassifier(backbone.to(memory_format=memory_format(config)).eval(), head, config)


def evaluate_classifier(clf: CNNClassifier, images, y) -> dict:
    """{"loss": mean cross-entropy, "acc": accuracy} of the classifier on images in [0, 1]."""
    return scores(clf.logits(images), y)


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
    precision: str       # what "auto" resolved to on that device
    n_params: int        # backbone + head


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop after zero padding by `pad` pixels, and a horizontal flip with probability 1/2.

    One gather for the whole batch (no per-image Python loop): x (B, C, H, W) -> (B, C, H, W).
    """
    (B, _, H, W), dev = x.shape, x.device
    padded = F.pad(x, (pad, pad, pad, pad))                                  # (B, C, H+2p, W+2p), zeros = black
    oy, ox = (torch.randint(0, 2 * pad + 1, (B, 1), generator=gen, device=dev) for _ in range(2))  # row, then column
    rows = (oy + torch.arange(H, device=dev))[:, :, None]                   # (B, H, 1)
    cols = (ox + torch.arange(W, device=dev))[:, None, :]                   # (B, 1, W)
    batch = torch.arange(B, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]                      # (B, H, W, C)
    flip = torch.rand(B, generator=gen, device=dev) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(2), out)
    # clone, not contiguous(): with C == 1 the permuted view already counts as contiguous but has NHWC
    # strides, which would silently switch the convolutions' memory format (config.channels_last decides).
    return out.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)  # (B, C, H, W)


def erase_batch(x: torch.Tensor, gen: torch.Generator, prob: float, min_side: int = 4, max_side: int = 16):
    """Random erasing (Zhong et al., 2017) with zeros: with probability `prob` an image gets one rectangle of
    random height and width in [min_side, max_side] pixels set to black, the background colour.
    One mask for the whole batch: x (B, C, H, W) -> (B, C, H, W)."""
    (B, _, H, W), dev = x.shape, x.device
    h, w = (torch.randint(min_side, max_side + 1, (B, 1, 1), generator=gen, device=dev) for _ in range(2))  # h first
    top = (torch.rand(B, 1, 1, generator=gen, device=dev) * (H - h + 1)).long()
    left = (torch.rand(B, 1, 1, generator=gen, device=dev) * (W - w + 1)).long()
    rows = torch.arange(H, device=dev)[None, :, None]                        # (1, H, 1)
    cols = torch.arange(W, device=dev)[None, None, :]                        # (1, 1, W)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # (B, H, W)
    chosen = torch.rand(B, 1, 1, generator=gen, device=dev) < prob
    return x.masked_fill((inside & chosen)[:, None], 0.0)


def make_torch_optimizer(config: CNNConfig, params: list[tuple[str, nn.Parameter]], lr: float):
    """Weight decay on conv / linear weights only: decaying biases and BN scales only hurts."""
    groups = [{"params": [p for _, p in params if p.ndim > 1], "weight_decay": config.weight_decay},
              {"params": [p for _, p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)  # as mlp_scratch's "sgd"
    # On a GPU one fused kernel updates every tensor: a step of this small net is bound by kernel launches.
    # Adam's weight decay is coupled L2; AdamW's is decoupled.
    kind = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return kind(groups, lr=lr, fused=bool(params) and params[0][1].is_cuda)


def lr_scale_schedule(config: CNNConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rates at each step: mlp_scratch's cosine schedule, after a linear
    warm-up over the first 25% of the steps for "onecycle"."""
    warmup = round(ONECYCLE_WARMUP * total_steps) if config.schedule == "onecycle" else 0
    return mlp_scratch.make_schedule("cosine", 1.0, total_steps, warmup_steps=warmup)


# ----------------------------------------------------------------------------------------------------------
# The bridge: where the CNN's features enter the scratch MLP
# ----------------------------------------------------------------------------------------------------------
def forward_backward(backbone: CNNBackbone, head, x, y, precision: str = "fp32", label_smoothing: float = 0.0):
    """THE BRIDGE, for images x (B, 1, 28, 28) and labels y (B,) int64 on one device. torch computes the
    features; the head (for ScratchHead: numpy, by hand) computes the loss and dL/dfeatures;
    features.backward(dL/dfeatures) continues the chain rule into the backbone exactly as if the head were a
    torch module. Fills the backbone's .grad and the head's grads; returns (loss, logits (B, 10)) as tensors on
    x's device: reading them waits for a GPU, so the caller decides when."""
    with _autocast(x.device, precision):
        features = backbone(x).float()                                   # (B, F), autograd graph kept
    loss, logits, dfeatures = head.forward_backward(features.detach(), y, label_smoothing)  # leaves torch
    backbone.zero_grad(set_to_none=True)
    features.backward(dfeatures)                                         # back into torch's autograd
    return loss, logits


# The two heads fit() trains on the features answer the same calls: forward_backward, step, logits, and
# `model`, the layer(s) whose weights fit() keeps from the best epoch.
class ScratchHead:
    """The numpy MLP of question 2 as the training head: features cross into numpy, dL/dfeatures comes back."""

    def __init__(self, mlp: mlp_scratch.MLP, config: CNNConfig):
        self.model, self.base_lr = mlp, config.head_lr
        self.optimizer = mlp_scratch.make_optimizer(config.optimizer, config.head_lr, config.momentum,
                                                    config.weight_decay)

    def forward_backward(self, features, y, label_smoothing):
        """features (B, F) detached, y (B,) -> (loss, logits (B, 10), dL/dfeatures (B, F)) as tensors on the
        features' device; fills the MLP's grads."""
        logits = self.model.forward(features.cpu().numpy(), train=True)                          # numpy forward
        loss, dlogits = mlp_scratch.softmax_cross_entropy(logits, y.cpu().numpy(), label_smoothing)  # by hand
        dfeatures = self.model.backward(dlogits)                                                 # numpy backward
        return (torch.tensor(loss, dtype=torch.float64), torch.from_numpy(logits).to(features.device),
                torch.from_numpy(np.ascontiguousarray(dfeatures, np.float32)).to(features.device))

    def step(self, lr_scale: float) -> None:
        self.optimizer.lr = self.base_lr * lr_scale
        self.optimizer.step(self.model.params, self.model.grads)

    def logits(self, features: torch.Tensor) -> np.ndarray:
        return self.model.forward(features.cpu().numpy(), train=False)


class LinearHead:
    """Frozen mode's temporary head: a torch nn.Linear behind the same calls, stepped at the backbone's rate,
    discarded after the backbone phase."""

    def __init__(self, config: CNNConfig, feature_dim: int, device: torch.device):
        torch.manual_seed(config.seed + 7)
        self.model, self.base_lr = nn.Linear(feature_dim, NUM_CLASSES).to(device), config.lr
        self.optimizer = make_torch_optimizer(config, list(self.model.named_parameters()), config.lr)

    def forward_backward(self, features, y, label_smoothing):
        features.requires_grad_(True)
        loss = F.cross_entropy(logits := self.model(features), y, label_smoothing=label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach(), logits.detach(), features.grad

    def step(self, lr_scale: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.base_lr * lr_scale
        self.optimizer.step()

    def logits(self, features: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.model(features).cpu().numpy()


def train_step(backbone: CNNBackbone, head, optimizer, x, y, config: CNNConfig, lr_scale: float = 1.0):
    """One step on the batch x (B, 1, 28, 28), y (B,) at lr_scale x the peak rates: forward_backward, then both
    optimizers step. (loss, logits)."""
    for g in optimizer.param_groups:
        g["lr"] = config.lr * lr_scale
    loss, logits = forward_backward(backbone, head, x, y, config.precision, config.label_smoothing)
    optimizer.step()
    head.step(lr_scale)
    return loss, logits


def train_epoch(config: CNNConfig, backbone: CNNBackbone, head, optimizer, X, y, lr_scale_at: Callable[[int], float],
                step0: int, gen: torch.Generator, shuffle_gen: torch.Generator, averaged: AveragedModel | None = None,
                bar_title: str | None = None):
    """One pass over X (N, 1, 28, 28) and y (N,), both on the device, in a fresh order, augmented (a progress
    bar with `bar_title`, unless None), updating the weight average `averaged` (unless None) after each step.
    Returns the running mean loss and accuracy (train mode).

    The running sums stay on the device, read once at the end: a GPU never waits for the host mid-epoch. A
    non-finite loss is therefore caught at the end of its epoch (NaN weights stay NaN, so nothing is missed)."""
    backbone.train()
    order = torch.randperm(len(X), generator=shuffle_gen).to(X.device)  # drawn on the CPU: same on every device
    loss_sum = torch.zeros((), dtype=torch.float64, device=X.device)
    correct = torch.zeros((), dtype=torch.int64, device=X.device)
    starts = range(0, len(X), config.batch_size)
    for step, start in enumerate(tqdm(starts, bar_title, leave=False, dynamic_ncols=True, disable=not bar_title)):
        idx = order[start:start + config.batch_size]
        x, yb = X[idx], y[idx]
        if config.augment:
            x = augment_batch(x, gen)
        if config.erase:
            x = erase_batch(x, gen, config.erase)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, logits = train_step(backbone, head, optimizer, x, yb, config, lr_scale_at(step0 + step))
        if averaged is not None:
            averaged.update_parameters(backbone)
        loss_sum += loss.double() * len(idx)
        correct += (logits.argmax(dim=1) == yb).sum()
    return loss_sum.item() / len(X), correct.item() / len(X)


def fit(config: CNNConfig, backbone: CNNBackbone, head, data: dict, device: torch.device, *,
        progress: bool, log: Callable[[str], None], phase: str) -> dict:
    """config.epochs of train_epoch + validation on data {"X", "y_device", "X_val", "y_val"} (training tensors
    on the device, validation labels in numpy) with a ScratchHead or a LinearHead. The backbone and head.model
    end with the weights of the epoch with the best val accuracy; returns {"history", "best_epoch",
    "epochs_run", "diverged"}."""
    optimizer = make_torch_optimizer(config, list(backbone.named_parameters()), config.lr)
    steps_per_epoch = math.ceil(len(data["X"]) / config.batch_size)
    lr_scale_at = lr_scale_schedule(config, steps_per_epoch * config.epochs)
    gen = torch.Generator(device=device).manual_seed(config.seed)   # augmentation
    shuffle_gen = torch.Generator().manual_seed(config.seed + 1)    # batch order
    # airbench's exponential moving average of the weights (BatchNorm's statistics too): it is what gets
    # validated and kept, smoothing the last steps' noise at no extra step. Its horizon is a fraction of the run,
    # so that a short grid run averages as a full one does (0.25 of the full run: a decay of 0.998 a step).
    # Frozen mode only: the joint head learns from the backbone's current features, which the average would not.
    decay = 1 - 1 / max(config.ema * steps_per_epoch * config.epochs, 1)
    averaged = AveragedModel(backbone, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) \
        if config.ema and config.head_mode == "frozen" else None
    validated = averaged.module if averaged else backbone
    # The average of the first steps is no model anyone keeps: only the epochs inside its horizon (the last
    # `ema` of the run) are validated, which saves most of validation's cost (a tenth of a run, mirrored).
    first_validated = math.ceil((1 - config.ema) * config.epochs) if averaged else 1
    best = {"val_acc": -1.0, "epoch": 0, "weights": copy.deepcopy((validated.state_dict(), head.model))}
    history, diverged = [], False
    for epoch in range(1, config.epochs + 1):
        t0, step = time.perf_counter(), (epoch - 1) * steps_per_epoch
        train_loss, train_acc = train_epoch(config, backbone, head, optimizer, data["X"], data["y_device"],
                                            lr_scale_at, step, gen, shuffle_gen, averaged,
                                            f"{phase} epoch {epoch}/{config.epochs}" if progress else None)
        train_seconds, checked = time.perf_counter() - t0, epoch >= first_validated
        scored = checked and math.isfinite(train_loss)  # a NaN training loss already says the run diverged
        val = scores(map_batches(validated, head.logits, data["X_val"], config, VAL_BATCH, config.tta),
                     data["y_val"]) if scored else {"loss": math.nan, "acc": math.nan}
        loss, which = (val["loss"], "validation") if scored else (train_loss, "training")
        if mlp_scratch.loss_blew_up(loss, NUM_CLASSES):
            diverged = True
            log(f"[{phase}] epoch {epoch}: {mlp_scratch.blew_up_message(loss, NUM_CLASSES, which)} -- diverged; "
                f"best weights so far restored")
            break
        row = {"epoch": epoch, "lr": config.lr * lr_scale_at(step), "train_loss": train_loss,
               "train_acc": train_acc, "val_loss": val["loss"], "val_acc": val["acc"],
               "seconds": time.perf_counter() - t0, "train_seconds": train_seconds, "phase": phase}
        history.append(row)
        log(f"[{phase}] epoch {epoch:3d}/{config.epochs}  lr {row['lr']:.2e}  train loss {train_loss:.4f} "
            f"acc {train_acc:.4f}  " + (f"val loss {val['loss']:.4f} acc {val['acc']:.4f}  " if checked else "")
            + f"{row['seconds']:.1f}s")
        if not checked:
            continue
        if val["acc"] > best["val_acc"]:
            best = {"val_acc": val["acc"], "epoch": epoch,
                    "weights": copy.deepcopy((validated.state_dict(), head.model))}
        elif config.patience and epoch - best["epoch"] >= config.patience:
            log(f"early stop: no val improvement for {config.patience} epochs (best {best['val_acc']:.4f} "
                f"at epoch {best['epoch']})")
            break
    backbone.load_state_dict(best["weights"][0])
    head.model = best["weights"][1]
    return {"history": history, "best_epoch": best["epoch"], "epochs_run": len(history), "diverged": diverged}


def head_training_set(classifier: CNNClassifier, data: dict) -> tuple[np.ndarray, np.ndarray]:
    """Frozen mode's training set for the MLP head: the features of each training image and, with test-time
    mirroring on, of its mirror image too (the head is then asked about both)."""
    features, labels = classifier.features(data["X"], VAL_BATCH), data["y"]
    if classifier.config.tta:
        features = np.concatenate([features, classifier.features(data["X"].flip(3), VAL_BATCH)])
        labels = np.concatenate([labels, labels])
    return features, labels


@threadpool_limits.wrap(limits=1, user_api="blas")  # numpy's idle BLAS threads would steal torch's cores
def train(config: CNNConfig, splits: Splits, *, progress: bool = False, log=None) -> CNNTrainResult:
    """Train backbone + scratch MLP head on splits.X_train, choosing the epoch on splits.X_val.

    `config.subset` (if set) trains on a stratified subset of that many images (more than there are is a
    cli.UserError); val (and test) stay whole. Never raises for a diverging run: it returns diverged=True with
    the best weights so far. numpy's BLAS is held at one thread meanwhile; torch's thread count is the
    caller's. Progress bars only when stderr is a terminal; `log` gets one line per epoch. In frozen mode the
    backbone is trained with a LinearHead, then mlp_scratch.train fits the MLP on its features (phase "head")."""
    t_start, log = time.perf_counter(), log or (lambda line: None)
    if config.validate().subset is not None and config.subset > len(splits.y_train):
        raise cli.UserError(f"subset {config.subset} is more than the {len(splits.y_train)} training images")
    splits = splits.subset(config.subset, None, seed=config.seed)  # unchanged for None or all the images
    device = resolve_device(config.device)
    backbone = build_backbone(config, *preprocessing.standardization_stats(splits.X_train))
    backbone = backbone.to(device, memory_format=memory_format(config))
    # The whole dataset as tensors on the device: indexing a tensor per batch costs far less than a
    # DataLoader's per-sample collation on a CPU.
    y = np.ascontiguousarray(splits.y_train, np.int64)
    data = {"X": check_images(splits.X_train).to(device), "y": y, "y_device": torch.from_numpy(y).to(device),
            "X_val": check_images(splits.X_val).to(device), "y_val": np.ascontiguousarray(splits.y_val, np.int64)}
    progress, joint = progress and sys.stderr.isatty(), config.head_mode == "joint"
    head = ScratchHead(build_head(config, backbone.feature_dim), config) if joint else \
        LinearHead(config, backbone.feature_dim, device)
    run = fit(config, backbone, head, data, device, phase="joint" if joint else "backbone", progress=progress, log=log)
    classifier = CNNClassifier(backbone, head.model if joint else build_head(config, backbone.feature_dim), config)
    if not joint and not run["diverged"]:  # frozen mode's second phase: the MLP on the (eval-mode) features
        result = mlp_scratch.train(mlp_scratch.MLPConfig(
            hidden=list(config.head_hidden), activation=config.head_activation, dropout=config.head_dropout,
            init="he", optimizer=config.optimizer, lr=config.head_lr, momentum=config.momentum,
            weight_decay=config.weight_decay, schedule="cosine", warmup_epochs=0.0, epochs=config.head_epochs,
            batch_size=config.batch_size, patience=config.patience, standardize=True, seed=config.seed, subset=None),
            *head_training_set(classifier, data), classifier.features(data["X_val"], VAL_BATCH),
            data["y_val"], progress=progress, log=log)
        offset, classifier.head = len(run["history"]), result.model
        run["history"] += [{**row, "epoch": offset + row["epoch"], "phase": "head"} for row in result.history]
        run.update(diverged=bool(result.diverged), epochs_run=offset + result.epochs_run,
                   best_epoch=offset + result.best_epoch)
    backbone.eval()
    return CNNTrainResult(classifier=classifier, **run, seconds=time.perf_counter() - t_start, device=str(device),
                          precision=resolve_precision(config.precision, device), n_params=classifier.n_params)


# ----------------------------------------------------------------------------------------------------------
# Layer statistics at initialisation (for the init study)
# ----------------------------------------------------------------------------------------------------------
def init_statistics(config: CNNConfig, images, y) -> list[dict]:
    """Per conv layer at initialisation, after one forward + backward (train mode, through the scratch head)
    on `images` in [0, 1]: {"layer": 1..5, "act_mean", "act_std" (of the post-ReLU activations),
    "dead_frac" (fraction of dead units: channel x position whose activation is exactly 0 for every image),
    "grad_norm" (||dL/dW_conv||_F)}. With or without BatchNorm (config.batchnorm)."""
    x = check_images(images)
    backbone = build_backbone(config, *preprocessing.standardization_stats(x.numpy().reshape(len(x), -1)))
    head = ScratchHead(build_head(config, backbone.feature_dim), config)  # both fresh, so in training mode
    acts: list[torch.Tensor] = []
    for relu in (m for m in backbone.layers if isinstance(m, nn.ReLU)):  # hooks on a throwaway backbone: never removed
        relu.register_forward_hook(lambda mod, inp, out: acts.append(out.detach()))
    forward_backward(backbone, head, x, torch.from_numpy(np.asarray(y, dtype=np.int64)))
    return [{"layer": i, "act_mean": float(a.mean()), "act_std": float(a.std()),
             "dead_frac": float((a == 0).all(dim=0).float().mean()), "grad_norm": float(conv.weight.grad.norm())}
            for i, (a, conv) in enumerate(zip(acts, backbone.convs), start=1)]


# ----------------------------------------------------------------------------------------------------------
# The README table and the command line
# ----------------------------------------------------------------------------------------------------------
def describe(config: CNNConfig | None = None) -> str:
    """Markdown table: for each pooling variant of `config` (the module docstring says what each pools where),
    feature size, parameters and compute."""
    config = config or CNNConfig()
    lines = [f"Filters {parse_filters(config.filters, config.base_filters)}, kernel {config.kernel_size}, "
             f"BatchNorm {'on' if config.batchnorm else 'off'}, head hidden {list(config.head_hidden)}:", "",
             "| pool | feature_dim | backbone params | head params | conv MMACs/image |", "|---|---:|---:|---:|---:|"]
    for pool in POOLS:
        b = CNNBackbone(replace(config, pool=pool))
        lines.append(f"| {pool} | {b.feature_dim} | {b.n_params:,} | {build_head(config, b.feature_dim).n_params:,} "
                     f"| {b.conv_macs() / 1e6:.1f} |")
    return "\n".join(lines)


def build_parser() -> cli.ArgumentParser:
    """One flag per CNNConfig field (its default, help and type from the field), then the run's own flags."""
    p = cli.ArgumentParser(description="Train the 5-conv CNN backbone with the scratch MLP head (Fashion-MNIST, "
                                       "assignment Q3). Defaults = the chosen configuration.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_config_flags(p, CNNConfig)
    a, path = p.add_argument, cli.path_arg
    a("--threads", type=cli.count_arg("threads", 1024), default=None, help="torch threads (default: torch's choice)")
    a("--data-dir", type=path, default=None, help="folder with the Fashion-MNIST files (see preprocessing.py)")
    a("--save", type=path, default=None, help="write the trained classifier to this directory")
    a("--json", type=path, default=None, help="write final metrics and the full config to this JSON file")
    a("--no-progress", action="store_true", help="no progress bar (the per-epoch lines remain)")
    a("--describe", action="store_true", help="print the pooling-variant table and exit")
    a("--no-test", action="store_true", help="do not evaluate on the test set (to time training, or while tuning)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 data, memory or write error, 2 usage error, 3 diverged, 130 interrupted."""
    return cli.run(train_from_args, "cnn_torch.py", argv, oom_hint=OOM_HINT)


def train_from_args(argv: list[str] | None = None) -> int:
    """The command line's work; the errors it raises (cli.UserError, preprocessing.DataError, cli.Diverged,
    a full disk, out of memory) become one line in main."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = cli.config_from_args(parser, CNNConfig, args)  # values in range, then writable outputs: before data
    if args.describe:
        print(describe(config))
        return 0
    # --save: its parent is checked (and made), so that a failed save leaves no empty folder behind.
    if args.save and (why := cli.cannot_write(Path(args.save).parent, folder=True)
                      or not_a_checkpoint_folder(args.save)):
        parser.error(f"--save: {why}")
    if args.json and (why := cli.cannot_write(args.json, folder=False)):
        parser.error(f"--json: {why}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print("config:", json.dumps(config.to_dict()))
    splits = preprocessing.load_splits(args.data_dir)
    if args.no_test:
        splits = replace(splits, X_test=None, y_test=None)
    result = train(config, splits, progress=not args.no_progress, log=print)
    if result.diverged:
        raise cli.Diverged(f"training diverged (the loss blew up) after {result.epochs_run} epochs; try a lower "
                           f"--lr / --head-lr")
    val, test = (None if X is None else evaluate_classifier(result.classifier, preprocessing.to_images(X), y)
                 for X, y in ((splits.X_val, splits.y_val), (splits.X_test, splits.y_test)))
    print(f"done: {result.epochs_run} epochs in {result.seconds:.1f}s on {result.device} ({result.precision}), "
          f"best epoch {result.best_epoch}; val acc {val['acc']:.4f}"
          + (f"  test acc {test['acc']:.4f}" if test else "") + f"  ({result.n_params:,} parameters)")
    if args.save:
        print("saved to", result.classifier.save(args.save))
    if args.json:
        record = {k: v for k, v in vars(result).items() if k != "classifier"}  # history, epochs, seconds, ...
        cli.atomic_write(args.json, json.dumps({"config": config.to_dict(), "val": val, "test": test, **record},
                                               indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
