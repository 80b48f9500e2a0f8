"""A multilayer perceptron for Fashion-MNIST, written from scratch in numpy (assignment Q2).

Every forward pass, backward pass, the loss and the optimizers are hand-written numpy; this file imports no
deep-learning or autodiff library. Top to bottom: the layers (each forward beside its backward), the softmax
cross-entropy, the MLP, its input checks and file format, optimizers and the learning-rate schedule,
training, the command line.

    python mlp_scratch.py                       # the chosen configuration (MLPConfig's defaults)
    python mlp_scratch.py --activation gelu --hidden 512 256 --dropout 0.3 --subset 5000
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

import cli
import preprocessing  # the shared data module (numpy only)
from preprocessing import IMAGE_SIDE, INPUT_DIM, NUM_CLASSES

INITS = ("he", "xavier", "random")
OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
LEAKY_SLOPE = 0.01  # torch's default negative slope
EVAL_BATCH = 4096  # rows per forward pass when evaluating: bounds memory, big enough for fast matmuls
PIXEL_RANGE = (0.0, 1.0)  # input_range of a model fed pixels; None for a head fed CNN features
PIXEL_HINT = "scale pixels to [0, 1], divide uint8 images by 255"
MAX_WIDTH = 65536  # widest hidden layer accepted: a 784 x 65536 float32 layer is already 200 MB
MAX_EPOCHS = 10_000


# --------------------------------------------------------------------------------------------------
# Layers. forward(x, train) keeps on self what backward needs; backward(dout) returns dx. N = batch size.
# --------------------------------------------------------------------------------------------------
def init_std(init: str, fan_in: int, fan_out: int) -> float:
    """The weight std of each initialisation, for the MLP's layers and the CNN's convolutions alike:
    "he" sqrt(2 / fan_in) (Kaiming normal, for ReLU); "xavier" sqrt(2 / (fan_in + fan_out)) (Glorot normal,
    for tanh / sigmoid); "random" 0.01, blind to the layer's size."""
    return {"he": math.sqrt(2.0 / fan_in), "xavier": math.sqrt(2.0 / (fan_in + fan_out)), "random": 0.01}[init]


class Linear:
    """out = x @ W + b. W: (fan_in, fan_out) drawn from N(0, init_std^2) in float64, then cast; b: zeros."""

    def __init__(self, fan_in: int, fan_out: int, rng: np.random.Generator, init: str = "he", dtype=np.float32):
        W = rng.standard_normal((fan_in, fan_out)) * init_std(init, fan_in, fan_out)
        self.params = {"W": W.astype(dtype), "b": np.zeros(fan_out, dtype=dtype)}
        self.grads: dict[str, np.ndarray] = {}  # fresh arrays from each backward

    def forward(self, x, train=False):
        self.x = x                                      # (N, fan_in)
        return x @ self.params["W"] + self.params["b"]  # (N, fan_out)

    def backward(self, dout, need_dx=True):
        """dout: (N, fan_out) -> dx (N, fan_in); sets self.grads to new arrays dW, db. need_dx=False skips
        dx, which nobody needs for the first layer in training (see MLP.backward)."""
        self.grads = {"W": self.x.T @ dout, "b": dout.sum(axis=0)}  # (fan_in, fan_out), (fan_out,)
        return dout @ self.params["W"].T if need_dx else None


class Standardize:
    """(x - mean) / std with the training inputs' mean and std: fixed statistics, not learned parameters."""

    def __init__(self, mean: float, std: float):
        self.mean, self.std = mean, std

    def forward(self, x, train=False):
        return (x - x.dtype.type(self.mean)) * x.dtype.type(1.0 / self.std)

    def backward(self, dout):
        return dout * dout.dtype.type(1.0 / self.std)


class LeakyReLU:
    """x for x > 0, slope * x otherwise."""
    slope = LEAKY_SLOPE

    def forward(self, x, train=False):
        self.scale = np.where(x > 0, x.dtype.type(1), x.dtype.type(self.slope))  # (N, H): d out / d x
        return x * self.scale

    def backward(self, dout):
        return dout * self.scale


class ReLU(LeakyReLU):
    """max(0, x): a leaky ReLU whose negative side is flat."""
    slope = 0.0


class Tanh:
    def forward(self, x, train=False):
        self.out = np.tanh(x)
        return self.out

    def backward(self, dout):
        return dout * (1 - self.out * self.out)


class Sigmoid:
    def forward(self, x, train=False):
        self.out = np.tanh(x * 0.5) * 0.5 + 0.5  # = 1 / (1 + exp(-x)), without exp overflow for large |x|
        return self.out

    def backward(self, dout):
        return dout * (self.out * (1 - self.out))


class GELU:
    """GELU in its tanh form (Hendrycks & Gimpel; torch's approximate="tanh"):
    x * Phi(x) ~= 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3). numpy has no erf, and the tanh
    form costs one tanh per unit, where an erf written in numpy cost twice the whole epoch of a ReLU net."""
    C, A = math.sqrt(2.0 / math.pi), 0.044715  # u = C (x + A x^3)

    def forward(self, x, train=False):
        self.x, self.t = x, np.tanh(self.C * (x + self.A * x * x * x))  # (N, H) each
        return 0.5 * x * (1.0 + self.t)

    def backward(self, dout):
        x, t = self.x, self.t
        du_dx = self.C * (1.0 + 3.0 * self.A * x * x)  # (N, H)
        return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx)


class Dropout:
    """Inverted dropout: in training each unit is zeroed with probability p_drop and the survivors are
    scaled by 1 / (1 - p_drop), so the expected activation is unchanged and eval needs no rescaling."""

    def __init__(self, p_drop: float, rng: np.random.Generator):
        self.p_drop, self.rng = p_drop, rng  # forward sets self.mask: (N, H), 0 or 1 / (1 - p_drop); None in eval

    def forward(self, x, train=False):
        if not train or self.p_drop == 0.0:
            self.mask = None
            return x
        keep = self.rng.random(x.shape, dtype=x.dtype) >= self.p_drop
        self.mask = np.multiply(keep, 1.0 / (1.0 - self.p_drop), dtype=x.dtype)
        return x * self.mask

    def backward(self, dout):
        return dout if self.mask is None else dout * self.mask


ACTIVATION_LAYERS = {"relu": ReLU, "leaky_relu": LeakyReLU, "tanh": Tanh, "gelu": GELU, "sigmoid": Sigmoid}
ACTIVATIONS = tuple(ACTIVATION_LAYERS)


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------
def log_softmax(z: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, max-subtracted (log-sum-exp): finite for logits of any size."""
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    """Class probabilities (N, C) from logits (N, C)."""
    return np.exp(log_softmax(z))


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray,
                          label_smoothing: float = 0.0) -> tuple[float, np.ndarray]:
    """Mean over the batch of the cross-entropy of softmax(logits) against integer labels, and its gradient.

    logits: (N, C); y: (N,) ints in [0, C). Returns (loss, dlogits), dlogits (N, C) = (softmax - target) / N,
    target the one-hot label or, with label_smoothing = e, (1 - e) * onehot + e / C (as torch's
    cross_entropy). Max-subtracted, so logits of any size give a finite loss and gradient.
    """
    n, n_classes = logits.shape
    rows = np.arange(n)
    log_probs = log_softmax(logits)                        # (N, C)
    nll = -log_probs[rows, y].mean()
    dlogits = np.exp(log_probs)                            # (N, C) = softmax(logits)
    dlogits[rows, y] -= 1.0 - label_smoothing
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean()
        dlogits -= label_smoothing / n_classes
    dlogits /= n
    return float(nll), dlogits


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------
class MLP:
    """[Standardize ->] (Linear -> activation [-> Dropout]) per hidden width -> Linear to the logits.

    params: {"W1", "b1", "W2", ...} in layer order, the Linear layers' own arrays (an optimizer updating them
    in place updates the layers); grads: the same keys, the fresh arrays of the last backward.
    input_mean / input_std: None, or the training inputs' statistics (a Standardize layer comes first).
    input_range: PIXEL_RANGE for a model fed pixels (predict and evaluate then refuse values outside it,
    such as raw 0-255 pixels), None for a head fed CNN features.
    """

    def __init__(self, in_dim: int, hidden: list[int], out_dim: int, activation: str = "relu",
                 dropout: float = 0.0, init: str = "he", seed: int = 0, dtype=np.float32,
                 input_range: tuple[float, float] | None = None):
        self.in_dim, self.hidden, self.out_dim = int(in_dim), [int(h) for h in hidden], int(out_dim)
        self.activation, self.dropout, self.init, self.seed = activation, float(dropout), init, seed
        self.dtype, self.input_mean, self.input_std = np.dtype(dtype), None, None
        self.input_range = None if input_range is None else (float(input_range[0]), float(input_range[1]))
        self.rng = np.random.default_rng(seed)  # initial weights and dropout masks; never the global seed
        dims = [self.in_dim, *self.hidden, self.out_dim]
        self.linears = [Linear(a, b, self.rng, init, self.dtype) for a, b in zip(dims[:-1], dims[1:])]
        self.body: list = [self.linears[0]]
        for linear in self.linears[1:]:  # between two Linear layers: the activation, then dropout (p may be 0)
            self.body += [ACTIVATION_LAYERS[activation](), Dropout(self.dropout, self.rng), linear]
        self.params = {f"{k}{i}": p for i, lin in enumerate(self.linears, 1) for k, p in lin.params.items()}

    @property
    def layers(self) -> list:
        """Every layer in order, Standardize first when the model has input statistics."""
        return self.body if self.input_mean is None else [Standardize(self.input_mean, self.input_std), *self.body]

    @property
    def grads(self) -> dict[str, np.ndarray]:
        return {f"{k}{i}": g for i, lin in enumerate(self.linears, 1) for k, g in lin.grads.items()}

    @property
    def n_params(self) -> int:
        return int(sum(p.size for p in self.params.values()))

    def forward(self, X: np.ndarray, train: bool = False) -> np.ndarray:
        """X: (N, in_dim) -> logits (N, out_dim). train=True turns dropout on. Does not check X (it runs
        every step); predict and evaluate do (check_input)."""
        h = np.asarray(X, dtype=self.dtype)
        for layer in self.layers:
            h = layer.forward(h, train)
        return h

    def backward(self, dlogits: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        """dlogits: (N, out_dim) from the last forward -> dX (N, in_dim), or None with need_dx=False."""
        d = np.asarray(dlogits, dtype=self.dtype)
        for layer in reversed(self.layers):
            if layer is self.linears[0] and not need_dx:
                # Training needs no dX. Speed trick kept: the first layer's dx is ~14% of the multiply-adds
                # of an epoch of the default 784-1024-1024-10 net, over the 5% bar of bench_mlp.
                return layer.backward(d, need_dx=False)
            d = layer.backward(d)
        return d

    def predict(self, X, batch_size: int = EVAL_BATCH) -> np.ndarray:
        """Class ids (N,) for X (check_input: rows, or images for a 784-input model; pixels in [0, 1])."""
        X = check_input(self, X)
        out = [self.forward(X[i:i + batch_size]).argmax(axis=1) for i in range(0, len(X), batch_size)]
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.params.items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for k, v in self.params.items():
            v[...] = state[k]  # in place: optimizers and layers hold these very arrays


# --------------------------------------------------------------------------------------------------
# Beside the maths: what input the model takes, and its file
# --------------------------------------------------------------------------------------------------
def check_input(model: MLP, X) -> np.ndarray:
    """X as (N, in_dim) if it is what the model takes: rows (N, in_dim), or for a 784-input model images
    (N, 28, 28) / (N, 1, 28, 28); floating, finite and, for a pixel model, inside input_range. Otherwise one
    ValueError saying what to do."""
    X = np.asarray(X)
    if model.in_dim == INPUT_DIM and X.shape[1:] in ((IMAGE_SIDE, IMAGE_SIDE), (1, IMAGE_SIDE, IMAGE_SIDE)):
        X = X.reshape(len(X), INPUT_DIM)
    if X.ndim != 2 or X.shape[1] != model.in_dim:
        side = IMAGE_SIDE
        images = f", (N, {side}, {side}) or (N, 1, {side}, {side})" if model.in_dim == INPUT_DIM else ""
        raise ValueError(f"input must have shape (N, {model.in_dim}){images}, got {X.shape}")
    lo_hi = model.input_range
    if X.dtype.kind != "f":
        raise ValueError(f"input must be floating point, got {X.dtype}" + (f": {PIXEL_HINT}" if lo_hi else ""))
    if not np.isfinite(X).all():
        raise ValueError("input holds NaN or infinite values: remove or repair those rows")
    if lo_hi and X.size and (X.min() < lo_hi[0] or X.max() > lo_hi[1]):
        raise ValueError(f"pixels must be in [{lo_hi[0]:g}, {lo_hi[1]:g}], not [{X.min():g}, {X.max():g}]: "
                         + PIXEL_HINT)
    return X


META = ("in_dim", "hidden", "out_dim", "activation", "dropout", "init", "seed", "dtype", "input_mean",
        "input_std", "input_range")


def model_bytes(model: MLP) -> bytes:
    """The model as .npz bytes: its weights and a JSON "meta" (architecture, input statistics); no pickle."""
    meta = {k: model.dtype.name if k == "dtype" else getattr(model, k) for k in META}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), **model.params)
    return buffer.getvalue()


def save_model(model: MLP, path: str | Path) -> Path:
    """Writes model_bytes atomically (a full disk leaves any old file as it was). Returns the path written
    (.npz appended if missing)."""
    path = Path(path)
    path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
    cli.atomic_write(path, model_bytes(model))
    return path


def load_model(path: str | Path) -> MLP:
    """The model save_model wrote. Anything else (truncated, a pickle, wrong shapes, weights that are not
    finite floating-point numbers, a std <= 0) raises one ValueError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            stats = meta.pop("input_mean", None), meta.pop("input_std", None)
            model = MLP(**meta)  # the architecture; input_range may be absent (an older file)
            arrays = {k: f[k] for k in model.params}
        if model.dtype.kind != "f":
            raise ValueError(f"dtype {model.dtype} is not floating point")
        for k, a in arrays.items():
            if a.dtype.kind != "f" or a.shape != model.params[k].shape or not np.isfinite(a).all():
                raise ValueError(f"{k} holds {a.dtype} values of shape {a.shape}, expected finite floating-point "
                                 f"weights of shape {model.params[k].shape}")
        if stats != (None, None) and not (all(isinstance(v, (int, float)) and math.isfinite(v) for v in stats)
                                          and stats[1] > 0):
            raise ValueError(f"input_mean {stats[0]} / input_std {stats[1]}: need a finite mean and std > 0")
    except (KeyError, TypeError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a model written by MLP.save ({e})") from None
    model.load_state(arrays)
    model.input_mean, model.input_std = stats
    return model


MLP.save, MLP.load = save_model, staticmethod(load_model)  # model.save(path), MLP.load(path): the file format


def evaluate(model: MLP, X, y: np.ndarray, batch_size: int = EVAL_BATCH) -> dict:
    """{"loss": mean cross-entropy, "acc": accuracy} in eval mode (no dropout), batch_size rows at a time, of X
    checked first (check_input)."""
    X, y = check_input(model, X), np.asarray(y)
    total_loss, correct = 0.0, 0
    for i in range(0, len(X), batch_size):
        logits, yb = model.forward(X[i:i + batch_size]), y[i:i + batch_size]
        total_loss += softmax_cross_entropy(logits, yb)[0] * len(yb)
        correct += int((logits.argmax(axis=1) == yb).sum())
    n = max(1, len(X))
    return {"loss": total_loss / n, "acc": correct / n}


# --------------------------------------------------------------------------------------------------
# Optimizers: step(params, grads) updates params in place; state is keyed by parameter name.
# Semantics follow torch.optim (tests compare against it step by step).
# --------------------------------------------------------------------------------------------------
class SGD:
    """SGD with (optionally Nesterov) momentum and L2 weight decay added to the gradient, as torch.optim.SGD."""

    def __init__(self, lr: float, momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0):
        self.lr, self.momentum, self.nesterov, self.weight_decay = lr, momentum, nesterov, weight_decay
        self.velocity: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        mu = self.momentum
        for k, p in params.items():
            d = grads[k] + self.weight_decay * p if self.weight_decay else grads[k]
            if mu:
                v = self.velocity[k] = mu * self.velocity.get(k, 0.0) + d  # v = mu v + d, v = 0 at first
                d = d + mu * v if self.nesterov else v
            p -= self.lr * d


class Adam:
    """Adam (Kingma & Ba). decoupled=False adds weight_decay * p to the gradient (torch's Adam);
    decoupled=True shrinks the weights by lr * weight_decay each step instead (AdamW, Loshchilov & Hutter)."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = False):
        self.lr, self.betas, self.eps, self.weight_decay, self.decoupled = lr, betas, eps, weight_decay, decoupled
        self.m, self.v, self.t = {}, {}, 0  # the moments of each parameter, by name; the step count
        self.tmp = {}  # a scratch array per parameter (see step)

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        b1, b2, t = *self.betas, self.t
        for k, p in params.items():
            g = grads[k] + self.weight_decay * p if self.weight_decay and not self.decoupled else grads[k]
            if k not in self.m:  # m = v = 0 at first
                self.m[k], self.v[k], self.tmp[k] = np.zeros_like(p), np.zeros_like(p), np.empty_like(p)
            # The textbook update, in place through one scratch array: with a temporary per operation the
            # default MLP's epoch took 0.87-0.89x torch's time on the study's AMD machine, in place 0.74-0.83x
            # (1.16x and 1.06x on an Intel Xeon; bench_mlp, idle 2-core machines): over the 5% bar on both.
            m, v, tmp = self.m[k], self.v[k], self.tmp[k]
            m *= b1                                                   # m = b1 m + (1 - b1) g
            m += np.multiply(g, 1 - b1, out=tmp)
            v *= b2                                                   # v = b2 v + (1 - b2) g^2
            v += np.multiply(np.multiply(g, 1 - b2, out=tmp), g, out=tmp)
            if self.weight_decay and self.decoupled:
                p *= 1 - self.lr * self.weight_decay
            # p -= lr m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t): in the
            # order torch.optim.Adam computes it (its results to the bit)
            np.divide(np.sqrt(v, out=tmp), math.sqrt(1 - b2 ** t), out=tmp)   # sqrt(v_hat)
            tmp += self.eps
            p -= np.multiply(np.divide(m, tmp, out=tmp), self.lr / (1 - b1 ** t), out=tmp)


def make_optimizer(name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> SGD | Adam:
    """"sgd" | "nesterov" | "adam" | "adamw" (KeyError otherwise). momentum is SGD's; Adam uses betas (0.9, 0.999)."""
    if name in ("sgd", "nesterov"):
        return SGD(lr, momentum=momentum, nesterov=name == "nesterov", weight_decay=weight_decay)
    return Adam(lr, weight_decay=weight_decay, decoupled={"adam": False, "adamw": True}[name])


# The learning rate after warm-up, from the peak lr and the fraction of the decay phase done.
DECAYS = {"cosine": lambda lr, frac: lr * 0.5 * (1.0 + math.cos(math.pi * frac)),  # to 0 at the end
          "step": lambda lr, frac: lr * 0.1 ** ((frac >= 0.5) + (frac >= 0.75)),  # x0.1 at 50% and 75%
          "constant": lambda lr, frac: lr}
SCHEDULES = tuple(DECAYS)


def make_schedule(kind: str, base_lr: float, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """lr_at(step) for step = 0 .. total_steps - 1: linear warm-up over warmup_steps, then DECAYS[kind].
    The CNN's one-cycle is "cosine" with warmup_steps = 25% of total_steps."""
    decay = DECAYS[kind]  # KeyError for an unknown kind
    warmup_steps = max(0, min(int(warmup_steps), total_steps))
    decay_steps = max(1, total_steps - warmup_steps)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return base_lr * (step + 1) / warmup_steps
        return decay(base_lr, min(1.0, (step - warmup_steps) / decay_steps))

    return lr_at


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
# Field rules of MLPConfig that cnn_torch's head fields share (the generic ones are cli's).
WIDTHS = (lambda v: isinstance(v, (list, tuple)) and all(cli.is_int(h) and 1 <= h <= MAX_WIDTH for h in v),
          f"a list of widths in [1, {MAX_WIDTH}]")
EPOCHS, PATIENCE = cli.integer(1, MAX_EPOCHS), cli.integer(0, MAX_EPOCHS)
SUBSET = (lambda v: v is None or cli.is_int(v) and v >= NUM_CLASSES,
          f"None or an integer >= {NUM_CLASSES} (one image per class)")


@dataclass
class MLPConfig:
    """One run's hyperparameters, each a flag of `python mlp_scratch.py`. The defaults are the chosen
    configuration (picked on validation accuracy; the study in run_experiments.py compares more)."""
    hidden: list[int] = cli.flag([768, 768], f"hidden widths, each at most {MAX_WIDTH} (none: softmax regression)",
                                 WIDTHS, type=int, nargs="*")
    activation: str = cli.flag("gelu", "hidden activation", choices=ACTIVATIONS)
    dropout: float = cli.flag(0.3, "drop probability after each hidden activation", cli.BELOW_ONE)
    init: str = cli.flag("he", "weight initialisation (init_std)", choices=INITS)
    optimizer: str = cli.flag("adamw", "optimizer", choices=OPTIMIZERS)
    lr: float = cli.flag(1e-3, "peak learning rate (after warm-up)", cli.POSITIVE)
    momentum: float = cli.flag(0.9, "SGD / Nesterov momentum", cli.BELOW_ONE)
    weight_decay: float = cli.flag(1e-2, "weight decay (decoupled for adamw, L2 in the gradient otherwise)",
                                   cli.NON_NEGATIVE)
    schedule: str = cli.flag("cosine", "learning-rate schedule", choices=SCHEDULES)
    warmup_epochs: float = cli.flag(1.0, "linear warm-up, in epochs", cli.NON_NEGATIVE)
    epochs: int = cli.flag(20, "training epochs", EPOCHS)
    batch_size: int = cli.flag(256, "mini-batch size", cli.integer(1, 1 << 20))
    patience: int = cli.flag(0, "early-stopping patience in epochs (0: off; the best epoch is restored anyway)",
                             PATIENCE)
    standardize: bool = cli.flag(True, "standardise the input with the training pixel mean and std (kept in the model)",
                                 cli.BOOL)
    seed: int = cli.flag(0, "random seed: weights, dropout masks and batch order", cli.SEED, type=cli.seed_arg)
    subset: int | None = cli.flag(None, "train on N training images (quick runs); None: all", SUBSET, type=int)

    to_dict = asdict  # config.to_dict(): its fields as a dict
    validate = cli.check_fields  # config.validate(): config, or ValueError("<field>: <what is wrong>")


@dataclass
class TrainResult:
    model: MLP
    history: list[dict]  # per epoch: epoch, lr, train_loss, train_acc, val_loss, val_acc, seconds
    best_epoch: int  # 1-based epoch whose weights the model holds (0: the initial weights)
    epochs_run: int
    diverged: bool  # a loss that blew up (loss_blew_up) stopped the run
    seconds: float


def train_epoch(model: MLP, optimizer, X: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator,
                lr_at: Callable[[int], float] | None = None, step0: int = 0, bar=None) -> tuple[float, float]:
    """One pass over (X, y) in a fresh random order: (loss, acc), running means over the epoch's mini-batches
    (training mode, so with dropout). A batch loss that is not finite stops the epoch: loss NaN."""
    order = rng.permutation(len(X))
    total_loss, correct = 0.0, 0
    for step, start in enumerate(range(0, len(X), batch_size), step0):
        idx = order[start:start + batch_size]
        xb, yb = X[idx], y[idx]
        if lr_at is not None:
            optimizer.lr = lr_at(step)
        logits = model.forward(xb, train=True)
        loss, dlogits = softmax_cross_entropy(logits, yb)
        if not math.isfinite(loss):
            return math.nan, math.nan
        model.backward(dlogits, need_dx=False)
        optimizer.step(model.params, model.grads)
        total_loss += loss * len(idx)
        correct += int((logits.argmax(axis=1) == yb).sum())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    return total_loss / len(X), correct / len(X)


def loss_blew_up(val_loss: float, n_classes: int) -> bool:
    """A validation cross-entropy that is not finite, or over 100 times a uniform guess's ln(n_classes): the
    logits have exploded (`python mlp_scratch.py --lr 10`: 903,500 after one epoch; on 5,000 images, 15,290
    and then a network stuck at chance), so the run has diverged even where the loss stays finite. A run that
    learns starts near ln(n_classes) and falls from there."""
    return not math.isfinite(val_loss) or val_loss > 100 * math.log(n_classes)


def blew_up_message(loss: float, n_classes: int, which: str = "validation") -> str:
    return f"the {which} loss blew up ({loss:.4g}; a uniform guess scores {math.log(n_classes):.2f})"


def train(config: MLPConfig, X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
          *, progress: bool = False, log: Callable[[str], None] | None = None,
          input_range: tuple[float, float] | None = None) -> TrainResult:
    """Trains an MLP as config says; float32 throughout. Returns the model holding the weights of the epoch
    with the best validation accuracy. A loss that blows up (loss_blew_up) stops the run with diverged=True
    (never raises for that); invalid config or data raise ValueError. input_range: PIXEL_RANGE when X holds
    pixels, so the model (and its saved file) refuses out-of-range input later; None for features."""
    t_start, log = time.perf_counter(), log or (lambda line: None)
    rng = np.random.default_rng(config.validate().seed)  # batch order and the subset; the model has its own
    X_train, y_train = np.ascontiguousarray(X_train, dtype=np.float32), np.asarray(y_train, dtype=np.int64)
    if config.subset is not None and config.subset < len(X_train):
        keep = np.sort(rng.permutation(len(X_train))[:config.subset])
        X_train, y_train = X_train[keep], y_train[keep]
    X_val, y_val = np.ascontiguousarray(X_val, dtype=np.float32), np.asarray(y_val, dtype=np.int64)
    # Ten Fashion-MNIST classes, more only if the labels say so (a small subset still has 10 outputs).
    n_classes = max(NUM_CLASSES, int(max(y_train.max(), y_val.max() if len(y_val) else 0)) + 1)
    model = MLP(X_train.shape[1], config.hidden, n_classes, config.activation, config.dropout, config.init,
                config.seed, input_range=input_range)
    if config.standardize:
        mean, std = preprocessing.standardization_stats(X_train)
        model.input_mean, model.input_std = mean, std or 1.0  # a constant input: nothing to scale
    check_input(model, X_train)
    optimizer = make_optimizer(config.optimizer, config.lr, config.momentum, config.weight_decay)
    steps_per_epoch = math.ceil(len(X_train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    lr_at = make_schedule(config.schedule, config.lr, total_steps, round(config.warmup_epochs * steps_per_epoch))
    history, best_acc, best_epoch, best_state, diverged = [], -1.0, 0, model.state(), False
    with tqdm(total=total_steps, unit="batch", dynamic_ncols=True, leave=False, disable=not progress) as bar:
        for epoch in range(1, config.epochs + 1):
            t0, step0 = time.perf_counter(), (epoch - 1) * steps_per_epoch
            loss, acc = train_epoch(model, optimizer, X_train, y_train, config.batch_size, rng, lr_at, step0, bar)
            val = evaluate(model, X_val, y_val) if not math.isnan(loss) else {"loss": math.nan, "acc": 0.0}
            if diverged := loss_blew_up(val["loss"], n_classes):  # NaN when training itself hit a non-finite loss
                log(f"epoch {epoch:3d}: {blew_up_message(val['loss'], n_classes)}; the run diverged (lr {config.lr:g})")
                break
            history.append({"epoch": epoch, "lr": lr_at(step0), "train_loss": loss, "train_acc": acc,
                            "val_loss": val["loss"], "val_acc": val["acc"], "seconds": time.perf_counter() - t0})
            log(f"epoch {epoch:3d}/{config.epochs}  lr {lr_at(step0):.2e}  train loss {loss:.4f} acc {acc:.4f}"
                f"  val loss {val['loss']:.4f} acc {val['acc']:.4f}  {history[-1]['seconds']:.1f}s")
            if val["acc"] > best_acc:
                best_acc, best_epoch, best_state = val["acc"], epoch, model.state()
            elif config.patience and epoch - best_epoch >= config.patience:
                log(f"early stop: no better val acc for {config.patience} epochs (best epoch {best_epoch})")
                break
    model.load_state(best_state)
    return TrainResult(model=model, history=history, best_epoch=best_epoch, epochs_run=len(history),
                       diverged=diverged, seconds=time.perf_counter() - t_start)


def layer_statistics(model: MLP, X: np.ndarray, y: np.ndarray) -> list[dict]:
    """Per hidden layer, at the model's current weights, from one eval-mode forward and backward on (X, y):
    act_mean / act_std of the activations (the inputs of the next Linear); dead_frac, the fraction of dead
    units: units whose activation is exactly 0 for every input of the batch (for ReLU, pre-activation <= 0);
    grad_norm, the Frobenius norm of dLoss/dW of the Linear feeding that layer."""
    logits = model.forward(check_input(model, X))
    model.backward(softmax_cross_entropy(logits, np.asarray(y))[1], need_dx=False)
    return [{"layer": i, "act_mean": float(lin.x.mean()), "act_std": float(lin.x.std()),
             "dead_frac": float((lin.x == 0).all(axis=0).mean()),
             "grad_norm": float(np.linalg.norm(model.grads[f"W{i}"]))} for i, lin in enumerate(model.linears[1:], 1)]


# --------------------------------------------------------------------------------------------------
# Command line. Exit codes (cli.run): 0 done, 1 data or file error, 2 usage error, 3 diverged, 130 Ctrl-C.
# --------------------------------------------------------------------------------------------------
def build_parser() -> cli.ArgumentParser:
    """One flag per MLPConfig field (its default, help and type from the field), and the run's outputs."""
    p = cli.ArgumentParser(description="Train the numpy MLP on Fashion-MNIST; defaults are the chosen configuration.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_config_flags(p, MLPConfig)
    a, path = p.add_argument, cli.path_arg  # the run's own flags; a path flag's default is None
    a("--data-dir", type=path, help="folder with the Fashion-MNIST files (None: searched for as preprocessing.py does)")
    a("--save", type=path, help="write the trained model to this .npz")
    a("--json", type=path, help="write final metrics and the full config to this JSON file")
    a("--no-progress", action="store_true", help="no progress bar (there is none anyway unless stderr is a terminal)")
    return p


def train_from_args(argv: list[str] | None = None) -> int:
    """The command line's work; the errors it raises (cli.UserError, preprocessing.DataError, cli.Diverged,
    a full disk, out of memory) become one line in main."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = cli.config_from_args(parser, MLPConfig, args)  # values in range, then writable outputs: before data
    for flag, path in (("--save", args.save), ("--json", args.json)):
        if path and (why := cli.cannot_write(path, folder=False)):
            parser.error(f"{flag}: {why}")
    # a stratified training subset (None: all); val and test whole
    splits = preprocessing.load_splits(args.data_dir).subset(config.subset, None, seed=config.seed)
    print("config:", json.dumps(config.to_dict()))
    print(f"data: {len(splits.X_train)} train / {len(splits.X_val)} val / {len(splits.X_test)} test images")
    progress = not args.no_progress and sys.stderr.isatty()
    log = tqdm.write if progress else print  # tqdm.write prints above the progress bar, not through it
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is reported below, in one line
        result = train(config, splits.X_train, splits.y_train, splits.X_val, splits.y_val, progress=progress,
                       log=log, input_range=PIXEL_RANGE)
    if result.diverged:
        raise cli.Diverged(f"training diverged (the loss blew up after {result.epochs_run} epochs): try a lower "
                           "--lr or --weight-decay")
    model = result.model
    val, test = (evaluate(model, X, y) for X, y in ((splits.X_val, splits.y_val), (splits.X_test, splits.y_test)))
    print(f"best epoch {result.best_epoch}/{result.epochs_run}  val acc {val['acc']:.4f}  test acc {test['acc']:.4f}"
          f"  ({result.seconds:.1f}s training, {model.n_params:,} parameters)")
    if args.save:
        print(f"saved model to {save_model(model, args.save)}")
    if args.json:  # diverged: always false here, a diverged run raised above
        out = dict(config=config.to_dict(), val_acc=val["acc"], val_loss=val["loss"], test_acc=test["acc"],
                   test_loss=test["loss"], train_seconds=result.seconds, epochs_run=result.epochs_run,
                   best_epoch=result.best_epoch, diverged=False, n_params=model.n_params, history=result.history)
        cli.atomic_write(args.json, json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The exit code of `python mlp_scratch.py ARGS`; user and environment errors are one line (cli.run)."""
    return cli.run(train_from_args, "mlp_scratch.py", argv,
                   oom_hint=": use fewer or narrower --hidden layers or a smaller --batch-size")


if __name__ == "__main__":
    sys.exit(main())
