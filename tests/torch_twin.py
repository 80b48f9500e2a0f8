"""The one torch copy of the scratch MLP that the tests use as an autograd oracle."""
import numpy as np
import torch
from torch import nn

import mlp_scratch as ms

TORCH_ACT = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(ms.LEAKY_SLOPE), "tanh": nn.Tanh,
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


def torch_twin(model: ms.MLP, masks: list[np.ndarray] | None = None) -> nn.Sequential:
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
            mods.append(TORCH_ACT[model.activation]())
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
