"""A multilayer perceptron for Fashion-MNIST, written from scratch in numpy (assignment Q2).

Every forward pass, backward pass, the loss and the optimizers are hand-written numpy: this file imports
no deep-learning or autodiff library (tests/test_mlp.py proves it). The torch twin used as a test oracle
and as the speed baseline lives only in the tests and in benchmarks/bench_mlp.py.

Layout, top to bottom: erf (for the exact GELU), layers (each forward beside its backward), the fused
softmax cross-entropy, the MLP, optimizers and learning-rate schedules, the training loop, the CLI.

    python mlp_scratch.py                       # the chosen configuration (MLPConfig's defaults)
    python mlp_scratch.py --activation gelu --hidden 512 256 --dropout 0.3 --subset 5000
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "gelu", "sigmoid")
INITS = ("he", "xavier", "random")
OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")
LEAKY_SLOPE = 0.01  # torch's default negative slope
EVAL_BATCH = 4096  # rows per forward pass when evaluating: bounds memory, big enough for fast matmuls


# --------------------------------------------------------------------------------------------------
# erf: numpy has none, and the exact GELU (torch's default) needs it. W. J. Cody's rational Chebyshev
# approximations (Math. Comp. 23, 1969; the CALERF routine of netlib's specfun) are accurate to float64
# precision, so the float64 finite-difference checks of GELU are not limited by the erf itself.
# --------------------------------------------------------------------------------------------------
_ERF_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02,
          3.20937758913846947e03, 1.85777706184603153e-1)
_ERF_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03,
          2.84423683343917062e03)
_ERF_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01,
          2.98635138197400131e02, 8.81952221241769090e02, 1.71204761263407058e03,
          2.05107837782607147e03, 1.23033935479799725e03, 2.15311535474403846e-8)
_ERF_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
          1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
          3.43936767414372164e03, 1.23033935480374942e03)
_ERF_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1,
          1.60837851487422766e-2, 6.58749161529837803e-4, 1.63153871373020978e-2)
_ERF_Q = (2.56852019228982242e00, 1.87295284992346725e00, 5.27905102951428412e-1,
          6.05183413124413191e-2, 2.33520497626869185e-3)
_INV_SQRT_PI = 5.6418958354775628695e-1


def _erf_small(x: np.ndarray) -> np.ndarray:
    """erf(x) for |x| <= 0.46875."""
    z = x * x
    num = _ERF_A[4] * z
    den = z.copy()
    for i in range(3):
        num = (num + _ERF_A[i]) * z
        den = (den + _ERF_B[i]) * z
    return x * (num + _ERF_A[3]) / (den + _ERF_B[3])


def _exp_neg_sq(y: np.ndarray) -> np.ndarray:
    """exp(-y*y), computed in two parts as Cody does so that the rounding of y*y costs no accuracy."""
    y_hi = np.trunc(y * 16.0) / 16.0
    return np.exp(-y_hi * y_hi) * np.exp(-(y - y_hi) * (y + y_hi))


def _erfc_mid(y: np.ndarray) -> np.ndarray:
    """erfc(y) for 0.46875 < y <= 4."""
    num = _ERF_C[8] * y
    den = y.copy()
    for i in range(7):
        num = (num + _ERF_C[i]) * y
        den = (den + _ERF_D[i]) * y
    return _exp_neg_sq(y) * (num + _ERF_C[7]) / (den + _ERF_D[7])


def _erfc_large(y: np.ndarray) -> np.ndarray:
    """erfc(y) for y > 4."""
    z = 1.0 / (y * y)
    num = _ERF_P[5] * z
    den = z.copy()
    for i in range(4):
        num = (num + _ERF_P[i]) * z
        den = (den + _ERF_Q[i]) * z
    r = z * (num + _ERF_P[4]) / (den + _ERF_Q[4])
    return _exp_neg_sq(y) * (_INV_SQRT_PI - r) / y


# Numerical Recipes' erfc Chebyshev fit (fractional error < 1.2e-7 everywhere): one branch-free formula, so
# float32 training pays ~15 elementwise passes instead of the masked gathers of the three-range float64 path.
_ERFC_NR = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398,
            1.48851587, -0.82215223, 0.17087277)


def _erf_fast32(x: np.ndarray) -> np.ndarray:
    """erf for float32 arrays, absolute error < 5e-7 (the fit plus float32 rounding): a few ulp near 1."""
    z = np.abs(x)
    t = z * np.float32(0.5)
    t += 1
    np.reciprocal(t, out=t)
    poly = t * np.float32(_ERFC_NR[9])
    for c in _ERFC_NR[8:0:-1]:
        poly += np.float32(c)
        poly *= t
    poly += np.float32(_ERFC_NR[0])
    np.multiply(z, z, out=z)
    np.subtract(poly, z, out=poly)
    np.exp(poly, out=poly)
    poly *= t  # erfc(|x|)
    np.subtract(1, poly, out=poly)  # erf(|x|)
    return np.copysign(poly, x, out=poly)


def erf(x: np.ndarray) -> np.ndarray:
    """Elementwise error function, same dtype as x. float64: Cody's approximations, accurate to ~1e-16
    relative (used by the gradient checks). float32: a faster fit, absolute error < 5e-7 (training)."""
    x = np.asarray(x)
    if x.dtype == np.float32:
        return _erf_fast32(x)
    y = np.abs(x)
    out = np.empty_like(x)
    small = y <= 0.46875
    out[small] = _erf_small(x[small])
    # Past |x| = 6, erfc < 3e-17 and erf is +-1 to float64 precision.
    mid = ~small & (y <= 4.0)
    if mid.any():
        out[mid] = np.copysign(1.0 - _erfc_mid(y[mid]), x[mid])
    large = (y > 4.0) & (y < 6.0)
    if large.any():
        out[large] = np.copysign(1.0 - _erfc_large(y[large]), x[large])
    huge = y >= 6.0  # also +-inf; NaN fails every comparison, so it is set explicitly below
    out[huge] = np.sign(x[huge])
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.nan
    return out


# --------------------------------------------------------------------------------------------------
# Layers. Each forward(x, train) keeps on self what its backward needs; backward(dout) returns dx and,
# for layers with parameters, fills self.grads with the keys of self.params.
# --------------------------------------------------------------------------------------------------
class Linear:
    """y = x @ W + b with W of shape (fan_in, fan_out)."""

    def __init__(self, fan_in: int, fan_out: int, init: str = "he", rng: np.random.Generator | None = None,
                 dtype=np.float32):
        rng = rng if rng is not None else np.random.default_rng(0)
        if init == "he":  # keeps the variance of ReLU pre-activations constant from layer to layer
            W = rng.standard_normal((fan_in, fan_out)) * math.sqrt(2.0 / fan_in)
        elif init == "xavier":  # Glorot uniform: variance 2 / (fan_in + fan_out), for tanh/sigmoid
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            W = rng.uniform(-limit, limit, (fan_in, fan_out))
        elif init == "random":  # the classic "small random numbers", blind to the layer's size
            W = rng.standard_normal((fan_in, fan_out)) * 0.01
        else:
            raise ValueError(f"unknown init {init!r}; choose from {INITS}")
        self.params = {"W": W.astype(dtype), "b": np.zeros(fan_out, dtype=dtype)}
        # Gradient buffers are allocated once and overwritten by every backward (no per-step allocation).
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.x = None

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        self.x = x  # (N, fan_in)
        out = x @ self.params["W"]  # (N, fan_out)
        out += self.params["b"]
        return out

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        """dout: (N, fan_out). need_dx=False skips dx (the first layer in training: nobody needs it)."""
        np.matmul(self.x.T, dout, out=self.grads["W"])  # (fan_in, fan_out)
        np.sum(dout, axis=0, out=self.grads["b"])
        return dout @ self.params["W"].T if need_dx else None  # (N, fan_in)


# inplace=True (set by MLP only) lets ReLU, LeakyReLU and Dropout overwrite their input in forward and
# dout in backward: inside the network both are temporaries nobody else holds (a Linear's fresh output and
# the next layer's fresh dx), and reusing them saves a memory pass and an allocation per layer and step.
# Standalone layers keep the default, inplace=False, and never touch their arguments.
class ReLU:
    def __init__(self, inplace: bool = False):
        self.inplace = inplace

    def forward(self, x, train=False):
        self.mask = x > 0
        return np.maximum(x, 0, out=x if self.inplace else None)

    def backward(self, dout):
        return np.multiply(dout, self.mask, out=dout if self.inplace else None)


class LeakyReLU:
    def __init__(self, slope: float = LEAKY_SLOPE, inplace: bool = False):
        self.slope, self.inplace = slope, inplace

    def forward(self, x, train=False):
        # slope where x <= 0, 1 where x > 0: a multiplier that serves forward and backward alike
        self.scale = np.where(x > 0, x.dtype.type(1), x.dtype.type(self.slope))
        return np.multiply(x, self.scale, out=x if self.inplace else None)

    def backward(self, dout):
        return np.multiply(dout, self.scale, out=dout if self.inplace else None)


class Tanh:
    def forward(self, x, train=False):
        self.out = np.tanh(x)
        return self.out

    def backward(self, dout):
        return dout * (1 - self.out * self.out)


class Sigmoid:
    def forward(self, x, train=False):
        # 0.5 * (1 + tanh(x / 2)) is the logistic function without exp overflow for large |x|.
        self.out = np.tanh(x * 0.5) * 0.5 + 0.5
        return self.out

    def backward(self, dout):
        return dout * (self.out * (1 - self.out))


class GELU:
    """Exact GELU, x * Phi(x) with the normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2, as torch's default."""

    def forward(self, x, train=False):
        self.x = x
        self.cdf = 0.5 * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))
        return x * self.cdf

    def backward(self, dout):
        x = self.x
        pdf = np.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
        return dout * (self.cdf + x * pdf)


class Dropout:
    """Inverted dropout: in training each unit is zeroed with probability p_drop and the survivors are
    scaled by 1 / (1 - p_drop), so the expected activation is unchanged and eval needs no rescaling."""

    def __init__(self, p_drop: float, rng: np.random.Generator, inplace: bool = False):
        if not 0.0 <= p_drop < 1.0:
            raise ValueError(f"p_drop must be in [0, 1), got {p_drop}")
        self.p_drop = p_drop
        self.rng = rng
        self.inplace = inplace
        self.mask = None  # (N, H) float: 0 or 1 / (1 - p_drop); None in eval mode

    def forward(self, x, train=False):
        if not train or self.p_drop == 0.0:
            self.mask = None
            return x
        # Uniforms drawn directly in the working dtype: half the memory traffic of float64 draws.
        keep = self.rng.random(x.shape, dtype=x.dtype) >= self.p_drop
        self.mask = np.multiply(keep, 1.0 / (1.0 - self.p_drop), dtype=x.dtype)
        return np.multiply(x, self.mask, out=x if self.inplace else None)

    def backward(self, dout):
        if self.mask is None:
            return dout
        return np.multiply(dout, self.mask, out=dout if self.inplace else None)


ACTIVATION_LAYERS = {"relu": ReLU, "leaky_relu": LeakyReLU, "tanh": Tanh, "gelu": GELU, "sigmoid": Sigmoid}


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------
def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray,
                          label_smoothing: float = 0.0) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(logits) against integer labels, and its gradient.

    logits: (N, C); y: (N,) ints in [0, C). Returns (loss, dlogits) with dlogits (N, C) = (softmax - target) / N,
    where target is the one-hot label, or with label_smoothing = e the mixture (1 - e) * onehot + e / C
    (as torch.nn.functional.cross_entropy's label_smoothing). The row maximum is subtracted first
    (log-sum-exp), so logits of any size give a finite loss and gradient.
    """
    n, n_classes = logits.shape
    rows = np.arange(n)
    shifted = logits - logits.max(axis=1, keepdims=True)  # (N, C), every row's max is 0
    exp = np.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)  # (N, 1), >= 1 so its log is finite
    log_sum = np.log(sum_exp[:, 0])           # (N,); log p_k = shifted_k - log_sum
    nll = log_sum.mean() - shifted[rows, y].mean()
    dlogits = exp / sum_exp
    dlogits[rows, y] -= 1.0 - label_smoothing
    if label_smoothing:
        uniform_nll = log_sum.mean() - shifted.mean()  # mean over rows and classes of -log p_k
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform_nll
        dlogits -= label_smoothing / n_classes
    dlogits /= n
    return float(nll), dlogits


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------
class MLP:
    """Linear -> activation -> dropout, repeated for each hidden width, then a final Linear to the logits.

    params / grads: dicts with the same keys "W1", "b1", "W2", ... in layer order (the arrays are those of
    the Linear layers, so an optimizer updating params in place updates the layers). grads are buffers
    that the next backward overwrites: copy them if you keep them.
    input_mean / input_std: None, or the training set's pixel statistics; forward standardises with them,
    so callers always pass pixels scaled to [0, 1].
    """

    def __init__(self, in_dim: int, hidden: list[int], out_dim: int, activation: str = "relu",
                 dropout: float = 0.0, init: str = "he", seed: int = 0, dtype=np.float32):
        if activation not in ACTIVATION_LAYERS:
            raise ValueError(f"unknown activation {activation!r}; choose from {ACTIVATIONS}")
        if any(int(h) < 1 for h in hidden):
            raise ValueError(f"hidden widths must be positive, got {list(hidden)}")
        self.in_dim, self.hidden, self.out_dim = int(in_dim), [int(h) for h in hidden], int(out_dim)
        self.activation, self.dropout, self.init, self.seed = activation, float(dropout), init, seed
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)  # initial weights and dropout masks; never the global seed
        self.input_mean: float | None = None
        self.input_std: float | None = None
        self.layers: list = []
        self.linears: list[Linear] = []
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        dims = [self.in_dim, *self.hidden, self.out_dim]
        for i in range(len(dims) - 1):
            linear = Linear(dims[i], dims[i + 1], init=init, rng=self.rng, dtype=self.dtype)
            self.layers.append(linear)
            self.linears.append(linear)
            for k in ("W", "b"):
                self.params[f"{k}{i + 1}"] = linear.params[k]
                self.grads[f"{k}{i + 1}"] = linear.grads[k]
            if i < len(self.hidden):
                act = ACTIVATION_LAYERS[activation]
                self.layers.append(act(inplace=True) if act in (ReLU, LeakyReLU) else act())
                if self.dropout > 0:
                    # Not in place after tanh / sigmoid: their backward reads the output dropout would scale.
                    keeps_output = act in (Tanh, Sigmoid)
                    self.layers.append(Dropout(self.dropout, self.rng, inplace=not keeps_output))

    @property
    def n_params(self) -> int:
        return int(sum(p.size for p in self.params.values()))

    def _standardize(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=self.dtype)
        if self.input_mean is not None:
            X = (X - self.dtype.type(self.input_mean)) * self.dtype.type(1.0 / self.input_std)
        return X

    def forward(self, X: np.ndarray, train: bool = False) -> np.ndarray:
        """X: (N, in_dim) pixels in [0, 1] -> logits (N, out_dim). train=True turns dropout on."""
        h = self._standardize(X)
        for layer in self.layers:
            h = layer.forward(h, train)
        return h

    def backward(self, dlogits: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        """dlogits: (N, out_dim) from the last forward -> dX (N, in_dim); fills self.grads.
        need_dx=False skips the first layer's dx (training never needs it)."""
        d = np.asarray(dlogits, dtype=self.dtype)
        for layer in reversed(self.layers[1:]):
            d = layer.backward(d)
        dx = self.layers[0].backward(d, need_dx=need_dx)
        if dx is not None and self.input_mean is not None:
            dx = dx * self.dtype.type(1.0 / self.input_std)  # chain rule through the standardisation
        return dx

    def predict_proba(self, X: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
        out = []
        for i in range(0, len(X), batch_size):
            z = self.forward(X[i:i + batch_size])
            z = np.exp(z - z.max(axis=1, keepdims=True))
            out.append(z / z.sum(axis=1, keepdims=True))
        return np.concatenate(out) if out else np.zeros((0, self.out_dim), self.dtype)

    def predict(self, X: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
        """Class ids (N,) for X (N, in_dim) pixels in [0, 1]."""
        out = [self.forward(X[i:i + batch_size]).argmax(axis=1) for i in range(0, len(X), batch_size)]
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.params.items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for k, v in self.params.items():
            v[...] = state[k]  # in place: optimizers and layers hold these very arrays

    def astype(self, dtype) -> "MLP":
        """A copy of this model in another dtype (float64 for gradient checks)."""
        other = MLP(self.in_dim, self.hidden, self.out_dim, self.activation, self.dropout, self.init,
                    self.seed, dtype=dtype)
        other.load_state(self.params)
        other.input_mean, other.input_std = self.input_mean, self.input_std
        return other

    def save(self, path: str | Path) -> Path:
        """Writes a self-contained .npz (weights, architecture, input statistics); no pickle. Returns the
        path written (np.savez appends .npz when missing)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"in_dim": self.in_dim, "hidden": self.hidden, "out_dim": self.out_dim,
                "activation": self.activation, "dropout": self.dropout, "init": self.init, "seed": self.seed,
                "dtype": self.dtype.name, "input_mean": self.input_mean, "input_std": self.input_std}
        np.savez(path, meta=np.array(json.dumps(meta)), **self.params)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "MLP":
        path = Path(path)
        if not path.exists() and path.with_name(path.name + ".npz").exists():
            path = path.with_name(path.name + ".npz")
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            model = cls(meta["in_dim"], meta["hidden"], meta["out_dim"], meta["activation"], meta["dropout"],
                        meta["init"], meta["seed"], dtype=meta["dtype"])
            model.load_state({k: f[k] for k in model.params})
        model.input_mean, model.input_std = meta["input_mean"], meta["input_std"]
        return model


# --------------------------------------------------------------------------------------------------
# Optimizers: step(params, grads) updates params in place; state is keyed by parameter name.
# Semantics follow torch.optim (tests compare against it step by step).
# --------------------------------------------------------------------------------------------------
UPDATE_CHUNK = 16384  # elements per slice in the fused updates: p, g, m, v and a scratch slice fit in L2


def _scratch_for(cache: dict, dtype) -> np.ndarray:
    """Two reusable scratch slices (2, UPDATE_CHUNK) per dtype."""
    if dtype not in cache:
        cache[dtype] = np.empty((2, UPDATE_CHUNK), dtype)
    return cache[dtype]


def _chunks(*arrays: np.ndarray):
    """Matching flat slices of same-shaped contiguous arrays, UPDATE_CHUNK elements at a time. Doing every
    step of an update on one cache-sized slice before moving on reads each array from memory once, instead
    of once per arithmetic step: the update is memory-bound, so this is most of its cost."""
    flat = [a.reshape(-1) for a in arrays]  # views: the arrays are contiguous
    for start in range(0, flat[0].size, UPDATE_CHUNK):
        yield [f[start:start + UPDATE_CHUNK] for f in flat]


class SGD:
    """SGD with (optionally Nesterov) momentum and L2 weight decay added to the gradient, as torch.optim.SGD:
    d = g + wd p; v = mu v + d; p -= lr (d + mu v if nesterov else v). In place, slice by slice (_chunks)."""

    def __init__(self, lr: float, momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0):
        self.lr, self.momentum, self.nesterov, self.weight_decay = lr, momentum, nesterov, weight_decay
        self.velocity: dict[str, np.ndarray] = {}
        self._scratch: dict[np.dtype, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        mu, wd = self.momentum, self.weight_decay
        for k, p in params.items():
            if k not in self.velocity:
                self.velocity[k] = np.zeros_like(p)
            scratch = _scratch_for(self._scratch, p.dtype)
            for p_, g_, v_ in _chunks(p, grads[k], self.velocity[k]):
                t, u = scratch[0, :p_.size], scratch[1, :p_.size]
                d = g_
                if wd:
                    np.multiply(p_, wd, out=t)
                    t += g_
                    d = t
                if mu:
                    v_ *= mu
                    v_ += d
                    if self.nesterov:
                        np.multiply(v_, mu, out=u)
                        u += d
                        d = u
                    else:
                        d = v_
                np.multiply(d, self.lr, out=u)
                p_ -= u


class Adam:
    """Adam (Kingma & Ba). decoupled=False adds weight_decay * p to the gradient (torch's Adam);
    decoupled=True shrinks the weights directly by lr * weight_decay each step (AdamW, Loshchilov & Hutter).

    The update is the textbook one, m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps), done in place slice by slice (_chunks)."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = False):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight_decay, self.decoupled = weight_decay, decoupled
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.t = 0
        self._scratch: dict[np.dtype, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        b1, b2 = self.betas
        step_size = self.lr / (1 - b1 ** self.t)
        inv_sqrt_bias2 = 1 / math.sqrt(1 - b2 ** self.t)
        shrink = 1 - self.lr * self.weight_decay if self.decoupled else 1.0
        l2 = 0.0 if self.decoupled else self.weight_decay
        for k, p in params.items():
            if k not in self.m:
                self.m[k], self.v[k] = np.zeros_like(p), np.zeros_like(p)
            scratch = _scratch_for(self._scratch, p.dtype)
            for p_, g_, m_, v_ in _chunks(p, grads[k], self.m[k], self.v[k]):
                t, u = scratch[0, :p_.size], scratch[1, :p_.size]
                if l2:  # coupled L2 (Adam): the decayed gradient g + wd * p, built in u
                    np.multiply(p_, l2, out=u)
                    u += g_
                    g_ = u
                m_ *= b1
                np.multiply(g_, 1 - b1, out=t)
                m_ += t
                v_ *= b2
                np.multiply(g_, g_, out=t)
                t *= 1 - b2
                v_ += t
                np.sqrt(v_, out=t)
                t *= inv_sqrt_bias2
                t += self.eps
                np.divide(m_, t, out=t)
                t *= step_size
                if shrink != 1.0:
                    p_ *= shrink
                p_ -= t


Optimizer = SGD | Adam


def make_optimizer(name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> Optimizer:
    """"sgd" | "nesterov" | "adam" | "adamw". momentum is SGD's; Adam uses betas (0.9, 0.999)."""
    if name == "sgd":
        return SGD(lr, momentum=momentum, weight_decay=weight_decay)
    if name == "nesterov":
        return SGD(lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return Adam(lr, weight_decay=weight_decay)
    if name == "adamw":
        return Adam(lr, weight_decay=weight_decay, decoupled=True)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def make_schedule(kind: str, base_lr: float, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """lr(step) for step = 0 .. total_steps - 1: linear warm-up over warmup_steps, then
    "cosine" (to 0 at the end), "step" (x0.1 at 50% and again at 75% of the rest) or "constant"."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose from {SCHEDULES}")
    warmup_steps = max(0, min(int(warmup_steps), total_steps))
    decay_steps = max(1, total_steps - warmup_steps)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return base_lr * (step + 1) / warmup_steps
        frac = min(1.0, (step - warmup_steps) / decay_steps)  # fraction of the decay phase done
        if kind == "cosine":
            return base_lr * 0.5 * (1.0 + math.cos(math.pi * frac))
        if kind == "step":
            return base_lr * (0.1 ** ((frac >= 0.5) + (frac >= 0.75)))
        return base_lr

    return lr_at


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
@dataclass
class MLPConfig:
    """One run's hyperparameters. The defaults are the chosen configuration, picked on validation accuracy
    (full 54k training set, seed 0): 1024-1024 dropout 0.3, 20 epochs: 0.9073; 512-512 dropout 0.2, 20 epochs:
    0.9015; 512-512 dropout 0.35, 30 epochs: 0.9042. The study (run_experiments.py) compares more."""
    hidden: list[int] = field(default_factory=lambda: [1024, 1024])  # hidden widths; [] = softmax regression
    activation: str = "relu"  # relu | leaky_relu | tanh | gelu | sigmoid
    dropout: float = 0.3  # drop probability after each hidden activation
    init: str = "he"  # he | xavier | random (N(0, 0.01))
    optimizer: str = "adamw"  # sgd | nesterov | adam | adamw
    lr: float = 1e-3  # peak learning rate (after warm-up)
    momentum: float = 0.9  # SGD / Nesterov only
    weight_decay: float = 1e-2  # decoupled for adamw, L2 in the gradient otherwise
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 1.0  # linear warm-up length, in epochs
    epochs: int = 20
    batch_size: int = 256
    patience: int = 0  # early stopping: epochs without a better val acc; 0 = off (best epoch still restored)
    standardize: bool = True  # subtract the training pixel mean, divide by its std (stored in the model)
    seed: int = 0  # weights, dropout masks and batch order
    subset: int | None = None  # train on this many training images (quick runs); None = all

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    model: MLP
    history: list[dict]  # per epoch: epoch, lr, train_loss, train_acc, val_loss, val_acc, seconds
    best_epoch: int  # 1-based epoch whose weights the model holds (0: the initial weights)
    epochs_run: int
    diverged: bool  # a NaN/inf loss stopped the run
    seconds: float


def evaluate(model: MLP, X: np.ndarray, y: np.ndarray, batch_size: int = EVAL_BATCH) -> dict:
    """{"loss": mean cross-entropy, "acc": accuracy} of the model in eval mode (no dropout)."""
    total_loss, correct = 0.0, 0
    for i in range(0, len(X), batch_size):
        logits = model.forward(X[i:i + batch_size])
        yb = y[i:i + batch_size]
        loss, _ = softmax_cross_entropy(logits, yb)
        total_loss += loss * len(yb)
        correct += int((logits.argmax(axis=1) == yb).sum())
    n = max(1, len(X))
    return {"loss": total_loss / n, "acc": correct / n}


def train_epoch(model: MLP, optimizer: Optimizer, X: np.ndarray, y: np.ndarray, batch_size: int,
                rng: np.random.Generator, lr_at: Callable[[int], float] | None = None, step0: int = 0,
                bar=None) -> dict:
    """One pass over (X, y) in a fresh random order. Returns {"loss", "acc", "steps", "diverged"}; loss and
    acc are running means over the epoch's mini-batches (training mode, so with dropout)."""
    n = len(X)
    order = rng.permutation(n)
    total_loss, correct, steps = 0.0, 0, 0
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        xb, yb = X[idx], y[idx]
        if lr_at is not None:
            optimizer.lr = lr_at(step0 + steps)
        logits = model.forward(xb, train=True)
        loss, dlogits = softmax_cross_entropy(logits, yb)
        if not math.isfinite(loss):
            return {"loss": float("nan"), "acc": correct / max(1, start), "steps": steps, "diverged": True}
        model.backward(dlogits, need_dx=False)
        optimizer.step(model.params, model.grads)
        total_loss += loss * len(idx)
        correct += int((logits.argmax(axis=1) == yb).sum())
        steps += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    return {"loss": total_loss / n, "acc": correct / n, "steps": steps, "diverged": False}


def train(config: MLPConfig, X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
          *, progress: bool = False, log: Callable[[str], None] | None = None) -> TrainResult:
    """Trains an MLP as config says; float32 throughout. Selects the epoch with the best validation
    accuracy and returns the model holding its weights. A NaN/inf loss stops the run with diverged=True
    (never raises for that)."""
    t_start = time.perf_counter()
    rng = np.random.default_rng(config.seed)  # batch order and the subset; the model has its own
    X_train = np.ascontiguousarray(X_train, dtype=np.float32)
    y_train = np.asarray(y_train, dtype=np.int64)
    if config.subset is not None and config.subset < len(X_train):
        keep = np.sort(rng.permutation(len(X_train))[:config.subset])
        X_train, y_train = X_train[keep], y_train[keep]
    X_val = np.ascontiguousarray(X_val, dtype=np.float32)
    y_val = np.asarray(y_val, dtype=np.int64)
    # Ten Fashion-MNIST classes, more only if the labels say so (a small subset still has 10 outputs).
    n_classes = max(10, int(max(y_train.max(), y_val.max() if len(y_val) else 0)) + 1)
    model = MLP(X_train.shape[1], config.hidden, n_classes, config.activation, config.dropout,
                config.init, config.seed)
    if config.standardize:
        # Statistics of the training split only; float64 sums so 40M float32 pixels add up exactly enough.
        model.input_mean = float(X_train.mean(dtype=np.float64))
        model.input_std = float(X_train.std(dtype=np.float64)) or 1.0
    optimizer = make_optimizer(config.optimizer, config.lr, config.momentum, config.weight_decay)
    steps_per_epoch = math.ceil(len(X_train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    lr_at = make_schedule(config.schedule, config.lr, total_steps, round(config.warmup_epochs * steps_per_epoch))

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, unit="batch", dynamic_ncols=True, leave=False)
    history: list[dict] = []
    best_acc, best_epoch, best_state = -1.0, 0, model.state()
    diverged, step = False, 0
    try:
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            lr = lr_at(step)
            stats = train_epoch(model, optimizer, X_train, y_train, config.batch_size, rng, lr_at, step, bar)
            step += stats["steps"]
            if stats["diverged"]:
                diverged = True
                if log:
                    log(f"epoch {epoch:3d}: loss is not finite; the run diverged (lr {config.lr:g})")
                break
            val = evaluate(model, X_val, y_val)
            row = {"epoch": epoch, "lr": lr, "train_loss": stats["loss"], "train_acc": stats["acc"],
                   "val_loss": val["loss"], "val_acc": val["acc"], "seconds": time.perf_counter() - t0}
            history.append(row)
            if log:
                log(f"epoch {epoch:3d}/{config.epochs}  lr {lr:.2e}  train loss {row['train_loss']:.4f} "
                    f"acc {row['train_acc']:.4f}  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  "
                    f"{row['seconds']:.1f}s")
            if not math.isfinite(val["loss"]):
                diverged = True
                break
            if val["acc"] > best_acc:
                best_acc, best_epoch, best_state = val["acc"], epoch, model.state()
            elif config.patience and epoch - best_epoch >= config.patience:
                if log:
                    log(f"early stop: no better val acc for {config.patience} epochs (best epoch {best_epoch})")
                break
    finally:
        if bar is not None:
            bar.close()
    model.load_state(best_state)
    return TrainResult(model=model, history=history, best_epoch=best_epoch, epochs_run=len(history),
                       diverged=diverged, seconds=time.perf_counter() - t_start)


def layer_statistics(model: MLP, X: np.ndarray, y: np.ndarray) -> list[dict]:
    """Per hidden layer, at the model's current weights, from one eval-mode forward and backward on (X, y):
    act_mean / act_std of the activations, dead_frac (units whose activation is <= 0 for every sample;
    meaningful for relu) and grad_norm (Frobenius norm of dLoss/dW of the Linear feeding that layer)."""
    h = model._standardize(X)
    acts = []
    for layer in model.layers:
        h = layer.forward(h, False)
        if type(layer) in ACTIVATION_LAYERS.values():
            acts.append(h)
    _, dlogits = softmax_cross_entropy(h, np.asarray(y))
    model.backward(dlogits, need_dx=False)
    return [{"layer": i + 1, "act_mean": float(a.mean()), "act_std": float(a.std()),
             "dead_frac": float((a <= 0).all(axis=0).mean()),
             "grad_norm": float(np.linalg.norm(model.grads[f"W{i + 1}"]))} for i, a in enumerate(acts)]


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = MLPConfig()
    p = argparse.ArgumentParser(description="Train the numpy MLP on Fashion-MNIST; defaults are the chosen "
                                "configuration.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, nargs="*", default=d.hidden, help="hidden widths (none: softmax regression)")
    p.add_argument("--activation", choices=ACTIVATIONS, default=d.activation, help="hidden activation")
    p.add_argument("--dropout", type=float, default=d.dropout, help="drop probability after each hidden layer")
    p.add_argument("--init", choices=INITS, default=d.init, help="weight initialisation")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="optimizer")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD/Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="learning-rate schedule")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up, in epochs")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="mini-batch size")
    p.add_argument("--patience", type=int, default=d.patience, help="early-stopping patience in epochs (0: off)")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=d.standardize,
                   help="standardise the input with the training pixel mean and std")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--subset", type=int, default=d.subset, help="train on N training images (quick runs)")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST files (None: searched for as preprocessing.py does)")
    p.add_argument("--save", default=None, help="write the trained model to this .npz")
    p.add_argument("--json", default=None, help="write final metrics and the full config to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> MLPConfig:
    """Builds the config, stopping with a one-line usage error on a bad value."""
    if any(h < 1 for h in args.hidden):
        parser.error(f"--hidden: widths must be positive integers, got {args.hidden}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be positive, got {args.lr}")
    if not 0.0 <= args.momentum < 1.0:
        parser.error(f"--momentum must be in [0, 1), got {args.momentum}")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        parser.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not args.warmup_epochs >= 0:
        parser.error(f"--warmup-epochs must be >= 0, got {args.warmup_epochs}")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.patience < 0:
        parser.error(f"--patience must be >= 0, got {args.patience}")
    if args.subset is not None and args.subset < 10:
        parser.error(f"--subset must be at least 10 (one image per class), got {args.subset}")
    return MLPConfig(**{f.name: getattr(args, f.name) for f in fields(MLPConfig)})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args, parser)
    import preprocessing  # the shared data module (numpy only)

    try:
        splits = preprocessing.load_splits(args.data_dir)
    except preprocessing.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if config.subset is not None:
        splits = splits.subset(config.subset, None, seed=config.seed)  # stratified; val and test stay whole
    print("config:", json.dumps(config.to_dict()))
    print(f"data: {len(splits.X_train)} train / {len(splits.X_val)} val / {len(splits.X_test)} test images")
    from tqdm import tqdm  # tqdm.write prints above the progress bar instead of through it

    result = train(config, splits.X_train, splits.y_train, splits.X_val, splits.y_val,
                   progress=not args.no_progress, log=tqdm.write)
    model = result.model
    val = evaluate(model, splits.X_val, splits.y_val)
    test = evaluate(model, splits.X_test, splits.y_test)
    status = "DIVERGED; " if result.diverged else ""
    print(f"{status}best epoch {result.best_epoch}/{result.epochs_run}  val acc {val['acc']:.4f}  "
          f"test acc {test['acc']:.4f}  ({result.seconds:.1f}s training, {model.n_params:,} parameters)")
    if args.save:
        print(f"saved model to {model.save(args.save)}")
    if args.json:
        out = {"config": config.to_dict(), "val_acc": val["acc"], "val_loss": val["loss"], "test_acc": test["acc"],
               "test_loss": test["loss"], "train_seconds": result.seconds, "epochs_run": result.epochs_run,
               "best_epoch": result.best_epoch, "diverged": result.diverged, "n_params": model.n_params,
               "history": result.history}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 1 if result.diverged else 0


if __name__ == "__main__":
    sys.exit(main())
