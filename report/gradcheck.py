"""The scratch MLP's one torch twin, and the gradient checks' own numbers for the report.

torch_twin(model) is an nn.Sequential computing what an mlp_scratch.MLP computes, with copies of its weights:
the autograd oracle of the tests, the network of the report's gradient check and the baseline of
benchmarks/bench_mlp.py.

The check: the scratch MLP's backward pass against central finite differences (float64) and against torch
autograd on its twin. Per activation and per layer: the relative error ||a - b|| / (||a|| + ||b||) of the
gradient of that layer's weights and biases together (Euclidean norms; an element-wise maximum would be ruled
by entries near zero). Takes a tenth of a second (and torch's import).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

import mlp_scratch  # run from the repository root: python -m report.gradcheck

TORCH_ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(mlp_scratch.LEAKY_SLOPE), "tanh": nn.Tanh,
                     "gelu": lambda: nn.GELU(approximate="tanh"), "sigmoid": nn.Sigmoid}


class _Standardize(nn.Module):
    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        return (x - self.mean) / self.std


class _FixedMask(nn.Module):
    """Dropout with the mask our forward drew (0 or 1 / (1 - p_drop))."""

    def __init__(self, mask: np.ndarray):
        super().__init__()
        self.mask = torch.from_numpy(mask)

    def forward(self, x):
        return x * self.mask


def torch_twin(model: mlp_scratch.MLP, masks: list[np.ndarray] | None = None) -> nn.Sequential:
    """nn.Sequential computing what model does, with copies of its weights and its dtype (torch's Linear
    stores W transposed). masks: our dropout masks, one per hidden layer, to reproduce a training forward;
    None: nn.Dropout (random masks; identity in eval mode)."""
    dtype = torch.float64 if model.dtype == np.float64 else torch.float32
    mods: list[nn.Module] = []
    if model.input_mean is not None:
        mods.append(_Standardize(model.input_mean, model.input_std))
    dims = [model.in_dim, *model.hidden, model.out_dim]
    for i in range(len(dims) - 1):
        lin = nn.Linear(dims[i], dims[i + 1], dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(model.params[f"W{i + 1}"].T.copy()))
            lin.bias.copy_(torch.from_numpy(model.params[f"b{i + 1}"]))
        mods.append(lin)
        if i < len(model.hidden):
            mods.append(TORCH_ACTIVATIONS[model.activation]())
            if model.dropout > 0:
                mods.append(_FixedMask(masks[i]) if masks is not None else nn.Dropout(model.dropout))
    return nn.Sequential(*mods)


def twin_grads(net: nn.Sequential) -> dict[str, np.ndarray]:
    """The twin's parameter gradients under our names (W transposed back)."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    out = {}
    for i, lin in enumerate(linears):
        out[f"W{i + 1}"], out[f"b{i + 1}"] = lin.weight.grad.numpy().T, lin.bias.grad.numpy()
    return out


# ------------------------------------------------------------------------------------------ the check
SHAPE = (12, [7, 6], 5)   # input, hidden widths, classes: every entry of every parameter is checked
N = 8                     # batch rows
EPS = 1e-6                # finite-difference step (float64)


def rel_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    a = np.concatenate([np.ravel(x) for x in a]).astype(np.float64)
    b = np.concatenate([np.ravel(x) for x in b]).astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-300))


def _net(activation: str, seed: int):
    rng = np.random.default_rng(seed)
    net = mlp_scratch.MLP(SHAPE[0], SHAPE[1], SHAPE[2], activation=activation, init="xavier", seed=seed,
                          dtype=np.float64)
    for k, v in net.params.items():
        if k.startswith("b"):
            v[...] = rng.normal(0, 0.5, v.shape)  # non-zero biases: zeros hide bugs
    X = rng.uniform(0, 1, (N, SHAPE[0]))
    y = rng.integers(0, SHAPE[2], N)
    return net, X, y


def finite_difference(net, X, y) -> dict[str, np.ndarray]:
    """Central differences of the loss, one parameter entry at a time (each restored afterwards)."""
    def loss_with(p: np.ndarray, i: tuple, value: float) -> float:
        old, p[i] = p[i], value
        loss = mlp_scratch.softmax_cross_entropy(net.forward(X, train=False), y)[0]
        p[i] = old
        return loss
    return {k: np.array([(loss_with(p, i, p[i] + EPS) - loss_with(p, i, p[i] - EPS)) / (2 * EPS)
                         for i in np.ndindex(p.shape)]).reshape(p.shape) for k, p in net.params.items()}


def torch_grads(net, X, y) -> dict[str, np.ndarray]:
    """The same network's gradients by torch autograd on its twin."""
    twin = torch_twin(net)
    torch.nn.functional.cross_entropy(twin(torch.from_numpy(X)), torch.from_numpy(y)).backward()
    return twin_grads(twin)


def check(activation: str, seed: int = 0) -> list[dict]:
    net, X, y = _net(activation, seed)
    _, dlogits = mlp_scratch.softmax_cross_entropy(net.forward(X, train=False), y)
    net.backward(dlogits)
    ours = net.grads  # fresh arrays, untouched by the forward passes of the finite differences
    fd, ref = finite_difference(net, X, y), torch_grads(net, X, y)
    keys = {layer: (f"W{layer}", f"b{layer}") for layer in range(1, len(SHAPE[1]) + 2)}
    return [{"activation": activation, "layer": layer, "fd": rel_error([ours[k] for k in ks], [fd[k] for k in ks]),
             "torch": rel_error([ours[k] for k in ks], [ref[k] for k in ks])} for layer, ks in keys.items()]


@functools.cache  # the checks depend on the code only: once per process
def run() -> dict:
    rows = [r for act in mlp_scratch.ACTIVATIONS for r in check(act)]
    return {"shape": {"input": SHAPE[0], "hidden": SHAPE[1], "classes": SHAPE[2], "batch": N},
            "eps": EPS, "dtype": "float64", "rows": rows}

