"""The gradient checks' own numbers, for the report: the scratch MLP's backward pass against central
finite differences (float64) and against PyTorch autograd on a copy of the same network.

Per activation and per layer: the relative error ||a - b|| / (||a|| + ||b||) of the gradient of that
layer's weights and biases together (Euclidean norms; an element-wise maximum would be ruled by entries
near zero). Takes about two seconds.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

import mlp_scratch  # run from the repository root: python -m report.gradcheck

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


TORCH_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
                     "leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, mlp_scratch.LEAKY_SLOPE),
                     "gelu": lambda z: torch.nn.functional.gelu(z, approximate="tanh")}


def torch_grads(net, X, y, activation: str) -> dict[str, np.ndarray]:
    """The same network's gradients by torch autograd, from a float64 copy of its parameters."""
    params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in net.params.items()}
    h = torch.tensor(X, dtype=torch.float64)
    n_layers = len(SHAPE[1]) + 1
    for i in range(1, n_layers + 1):
        h = h @ params[f"W{i}"] + params[f"b{i}"]
        if i < n_layers:
            h = TORCH_ACTIVATIONS[activation](h)
    torch.nn.functional.cross_entropy(h, torch.tensor(y)).backward()
    return {k: p.grad.numpy() for k, p in params.items()}


def check(activation: str, seed: int = 0) -> list[dict]:
    net, X, y = _net(activation, seed)
    _, dlogits = mlp_scratch.softmax_cross_entropy(net.forward(X, train=False), y)
    net.backward(dlogits)
    ours = net.grads  # fresh arrays, untouched by the forward passes of the finite differences
    fd, ref = finite_difference(net, X, y), torch_grads(net, X, y, activation)
    keys = {layer: (f"W{layer}", f"b{layer}") for layer in range(1, len(SHAPE[1]) + 2)}
    return [{"activation": activation, "layer": layer, "fd": rel_error([ours[k] for k in ks], [fd[k] for k in ks]),
             "torch": rel_error([ours[k] for k in ks], [ref[k] for k in ks])} for layer, ks in keys.items()]


@functools.cache  # the checks depend on the code only: once per process
def run() -> dict:
    rows = [r for act in mlp_scratch.ACTIVATIONS for r in check(act)]
    return {"shape": {"input": SHAPE[0], "hidden": SHAPE[1], "classes": SHAPE[2], "batch": N},
            "eps": EPS, "dtype": "float64", "rows": rows}

