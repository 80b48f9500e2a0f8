"""Tests of mlp_scratch.py: finite differences and a torch autograd oracle for every layer, the loss and the
whole network; optimizers against torch.optim; training behaviour; save/load; the command line; no torch."""
import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mlp_scratch as ms
from mlp_scratch import MLP, MLPConfig, softmax_cross_entropy

REPO = Path(__file__).resolve().parents[1]
F64 = np.float64
TORCH_ACT = {"relu": F.relu, "leaky_relu": lambda h: F.leaky_relu(h, 0.01), "tanh": torch.tanh,
             "gelu": F.gelu, "sigmoid": torch.sigmoid}


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Relative error of two whole tensors: ||a - b|| / (||a|| + ||b||)."""
    a, b = np.asarray(a, F64), np.asarray(b, F64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-300))


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f() with respect to every element of x (changed in place, restored)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = f()
        x[i] = old - eps
        down = f()
        x[i] = old
        grad[i] = (up - down) / (2 * eps)
    return grad


def random_model(hidden, activation="relu", dropout=0.0, in_dim=7, out_dim=5, seed=0, standardize=False):
    """A float64 model with random non-zero biases (zero biases hide bugs)."""
    model = MLP(in_dim, hidden, out_dim, activation, dropout, seed=seed, dtype=F64)
    rng = np.random.default_rng(seed + 100)
    for k, p in model.params.items():
        if k.startswith("b"):
            p[...] = rng.normal(0, 0.5, p.shape)
    if standardize:
        model.input_mean, model.input_std = 0.3, 0.7
    return model


# ------------------------------------------------------------------------------------------- erf
def test_erf_matches_math_erf_to_float64_precision():
    x = np.concatenate([np.linspace(-7, 7, 20001), [0.0, 0.46875, 0.4688, 4.0, 4.0001, 5.99, 6.0, 1e-12, -30]])
    ref = np.array([math.erf(v) for v in x])
    rel = np.abs(ms.erf(x) - ref) / np.maximum(np.abs(ref), 1e-300)
    assert rel.max() < 2e-15
    assert np.isnan(ms.erf(np.array([np.nan]))[0])
    x32 = x.astype(np.float32)
    out32 = ms.erf(x32)
    assert out32.dtype == np.float32 and np.abs(out32 - [math.erf(float(v)) for v in x32]).max() < 5e-7


# ---------------------------------------------------------------------- finite differences (float64)
LAYERS = {
    "linear": lambda rng: ms.Linear(4, 3, rng=rng, dtype=F64),
    "relu": lambda rng: ms.ReLU(), "leaky_relu": lambda rng: ms.LeakyReLU(), "tanh": lambda rng: ms.Tanh(),
    "sigmoid": lambda rng: ms.Sigmoid(), "gelu": lambda rng: ms.GELU(),
    "dropout": lambda rng: ms.Dropout(0.4, rng),
}


@pytest.mark.parametrize("name", LAYERS)
def test_layer_finite_differences(name):
    rng = np.random.default_rng(1)
    layer = LAYERS[name](rng)
    if name == "linear":
        layer.params["b"][...] = rng.normal(0, 1, 3)
    x = rng.normal(0, 1.5, (5, 4))
    dout = rng.normal(0, 1, (5, 3) if name == "linear" else (5, 4))

    def f():  # sum(out * dout) has gradient dout with respect to out
        if name == "dropout":
            layer.rng = np.random.default_rng(7)  # the same mask on every call
        return float((layer.forward(x, train=True) * dout).sum())

    f()
    dx = layer.backward(dout)
    assert rel_error(dx, numeric_grad(f, x)) < 1e-6
    for k, p in getattr(layer, "params", {}).items():
        f()
        layer.backward(dout)
        assert rel_error(layer.grads[k].copy(), numeric_grad(f, p)) < 1e-6, k


def test_loss_finite_differences():
    rng = np.random.default_rng(2)
    logits, y = rng.normal(0, 3, (6, 5)), rng.integers(0, 5, 6)
    _, dlogits = softmax_cross_entropy(logits, y)
    assert rel_error(dlogits, numeric_grad(lambda: softmax_cross_entropy(logits, y)[0], logits)) < 1e-6


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_loss_with_label_smoothing_matches_finite_differences_and_torch(smoothing):
    rng = np.random.default_rng(3)
    logits, y = rng.normal(0, 3, (6, 5)), rng.integers(0, 5, 6)
    loss, dlogits = softmax_cross_entropy(logits, y, label_smoothing=smoothing)
    numeric = numeric_grad(lambda: softmax_cross_entropy(logits, y, label_smoothing=smoothing)[0], logits)
    assert rel_error(dlogits, numeric) < 1e-6
    z = torch.tensor(logits, requires_grad=True)
    ref = F.cross_entropy(z, torch.tensor(y), label_smoothing=smoothing)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    assert rel_error(dlogits, z.grad.numpy()) < 1e-12


@pytest.mark.parametrize("activation,hidden,dropout", [
    ("relu", [6, 5], 0.0), ("gelu", [6], 0.3), ("tanh", [6, 4, 5], 0.2), ("sigmoid", [], 0.0),
    ("leaky_relu", [5, 5], 0.0)])
def test_network_finite_differences(activation, hidden, dropout):
    model = random_model(hidden, activation, dropout, standardize=True)
    rng = np.random.default_rng(3)
    X, y = rng.random((8, 7)), rng.integers(0, 5, 8)

    def forward_fixed_masks():
        for layer in model.layers:
            if isinstance(layer, ms.Dropout):
                layer.rng = np.random.default_rng(11)  # the same dropout masks on every call
        return model.forward(X, train=True)

    def f():
        return softmax_cross_entropy(forward_fixed_masks(), y)[0]

    dX = model.backward(softmax_cross_entropy(forward_fixed_masks(), y)[1])
    grads = {k: g.copy() for k, g in model.grads.items()}
    for k, p in model.params.items():
        assert rel_error(grads[k], numeric_grad(f, p)) < 1e-6, k
    assert rel_error(dX, numeric_grad(f, X)) < 1e-6


# ------------------------------------------------------------------------------- torch oracle
def check_against_torch(model: MLP, X: np.ndarray, y: np.ndarray, train: bool = False) -> None:
    """Our forward, loss and every gradient against torch autograd on a twin with the same weights and,
    with train=True, the same dropout masks that our forward drew."""
    logits = model.forward(X, train=train)
    loss, dlogits = softmax_cross_entropy(logits, y)
    dX = model.backward(dlogits)
    masks = [layer.mask for layer in model.layers if isinstance(layer, ms.Dropout)]

    tp = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    tX = torch.tensor(X, requires_grad=True)
    h = tX if model.input_mean is None else (tX - model.input_mean) / model.input_std
    for i in range(len(model.hidden)):
        h = TORCH_ACT[model.activation](h @ tp[f"W{i + 1}"] + tp[f"b{i + 1}"])
        if masks and masks[i] is not None:
            h = h * torch.tensor(masks[i])
    t_logits = h @ tp[f"W{len(model.hidden) + 1}"] + tp[f"b{len(model.hidden) + 1}"]
    t_loss = F.cross_entropy(t_logits, torch.tensor(y))
    t_loss.backward()

    np.testing.assert_allclose(logits, t_logits.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert loss == pytest.approx(t_loss.item(), rel=1e-12)
    np.testing.assert_allclose(dX, tX.grad.numpy(), rtol=1e-8, atol=1e-12)
    for k in model.params:
        np.testing.assert_allclose(model.grads[k], tp[k].grad.numpy(), rtol=1e-8, atol=1e-12, err_msg=k)


ORACLE_DATA = np.random.default_rng(4).random((16, 7)), np.random.default_rng(5).integers(0, 5, 16)


@pytest.mark.parametrize("activation", ms.ACTIVATIONS)
@pytest.mark.parametrize("hidden", [[], [9], [9, 6], [8, 8, 8, 6]])
def test_torch_oracle(activation, hidden):
    check_against_torch(random_model(hidden, activation, standardize=True), *ORACLE_DATA)


@pytest.mark.parametrize("activation", ms.ACTIVATIONS)
def test_torch_oracle_dropout_fixed_mask(activation):
    check_against_torch(random_model([9, 6], activation, dropout=0.5), *ORACLE_DATA, train=True)


def test_oracle_float32_model():
    """The float32 model agrees with the float64 oracle to float32 precision."""
    model = random_model([32, 16], "gelu")
    model32 = model.astype(np.float32)
    X, _ = ORACLE_DATA
    np.testing.assert_allclose(model32.forward(X.astype(np.float32)), model.forward(X), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_huge_logits(dtype):
    rng = np.random.default_rng(6)
    logits = (rng.normal(0, 1, (8, 10)) * 1e4).astype(dtype)
    y = rng.integers(0, 10, 8)
    loss, dlogits = softmax_cross_entropy(logits, y)
    assert math.isfinite(loss) and np.isfinite(dlogits).all() and dlogits.dtype == dtype
    ref = F.cross_entropy(torch.tensor(logits, dtype=torch.float64), torch.tensor(y)).item()
    assert loss == pytest.approx(ref, rel=1e-6)
    np.testing.assert_allclose(dlogits.sum(axis=1), 0, atol=1e-6)


# --------------------------------------------------------------------------------------- dropout
def test_dropout_keeps_expected_activation_and_eval_is_identity():
    layer = ms.Dropout(0.3, np.random.default_rng(0))
    x = np.ones((400, 500), np.float32)
    out = layer.forward(x, train=True)
    assert abs(out.mean() - 1.0) < 0.01 and abs((out == 0).mean() - 0.3) < 0.01
    assert out.dtype == np.float32
    assert layer.forward(x, train=False) is x


def test_eval_is_deterministic_and_train_is_not():
    model = MLP(20, [30], 4, dropout=0.5, seed=1)
    X = np.random.default_rng(0).random((10, 20), dtype=np.float32)
    a, b = model.forward(X).copy(), model.forward(X).copy()
    np.testing.assert_array_equal(a, b)
    c, d = model.forward(X, train=True).copy(), model.forward(X, train=True).copy()
    assert not np.array_equal(c, d)


# ------------------------------------------------------------------------------------ optimizers
@pytest.mark.parametrize("name,torch_opt", [
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("nesterov", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adam", lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01)),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)),
])
def test_optimizer_matches_torch(name, torch_opt):
    rng = np.random.default_rng(7)
    params = {"W1": rng.normal(0, 1, (4, 3)), "b1": rng.normal(0, 1, 3)}
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    t_opt = torch_opt(list(tparams.values()))
    group = t_opt.param_groups[0]
    ours = ms.make_optimizer(name, group["lr"], momentum=group.get("momentum", 0.9),
                             weight_decay=group["weight_decay"])
    for step in range(6):
        lr = group["lr"] * (0.5 if step >= 3 else 1.0)  # a schedule changes lr between steps
        ours.lr = lr
        for g in t_opt.param_groups:
            g["lr"] = lr
        grads = {k: rng.normal(0, 1, v.shape) for k, v in params.items()}
        ours.step(params, grads)
        for k, p in tparams.items():
            p.grad = torch.tensor(grads[k])
        t_opt.step()
    for k in params:
        np.testing.assert_allclose(params[k], tparams[k].detach().numpy(), rtol=1e-10, atol=1e-12)


def test_schedules():
    cos = ms.make_schedule("cosine", 1.0, 100, warmup_steps=10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0) and cos(10) == pytest.approx(1.0)
    assert cos(55) == pytest.approx(0.5) and cos(99) < 0.01
    step = ms.make_schedule("step", 1.0, 100)
    assert [step(0), step(50), step(80)] == pytest.approx([1.0, 0.1, 0.01])
    assert ms.make_schedule("constant", 0.3, 10)(9) == 0.3


# -------------------------------------------------------------------------------------- training
TINY = dict(hidden=[32], epochs=3, batch_size=64, lr=3e-3, warmup_epochs=0.5)


def test_same_seed_gives_identical_weights(synthetic_splits):
    s = synthetic_splits
    runs = [ms.train(MLPConfig(**TINY, dropout=0.2, seed=seed), s.X_train, s.y_train, s.X_val, s.y_val)
            for seed in (3, 3, 4)]
    for k in runs[0].model.params:
        np.testing.assert_array_equal(runs[0].model.params[k], runs[1].model.params[k])
    assert not np.array_equal(runs[0].model.params["W1"], runs[2].model.params["W1"])
    assert [r["val_acc"] for r in runs[0].history] == [r["val_acc"] for r in runs[1].history]


def test_training_keeps_float32(synthetic_splits):
    s = synthetic_splits
    model = ms.train(MLPConfig(**TINY), s.X_train, s.y_train, s.X_val, s.y_val).model
    assert all(p.dtype == np.float32 for p in [*model.params.values(), *model.grads.values()])
    assert model.forward(s.X_val).dtype == np.float32


def test_best_epoch_is_restored_and_early_stopping(synthetic_splits):
    s = synthetic_splits
    cfg = MLPConfig(hidden=[64], epochs=6, batch_size=32, lr=0.05, optimizer="sgd", schedule="constant",
                    warmup_epochs=0, dropout=0.0)
    result = ms.train(cfg, s.X_train, s.y_train, s.X_val, s.y_val)
    best = max(r["val_acc"] for r in result.history)
    assert ms.evaluate(result.model, s.X_val, s.y_val)["acc"] == best
    assert result.history[result.best_epoch - 1]["val_acc"] == best
    # With a learning rate of ~0 nothing improves after epoch 1, so patience 2 stops after epoch 3.
    still = ms.train(MLPConfig(**{**TINY, "epochs": 10, "lr": 1e-30}, patience=2),
                     s.X_train, s.y_train, s.X_val, s.y_val)
    assert still.epochs_run == 3 and still.best_epoch == 1
    assert set(still.history[0]) == {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"}


def test_divergence_is_reported_not_raised(synthetic_splits):
    s = synthetic_splits
    cfg = MLPConfig(hidden=[64], optimizer="sgd", lr=1e8, epochs=3, schedule="constant", warmup_epochs=0)
    with np.errstate(all="ignore"):
        result = ms.train(cfg, s.X_train, s.y_train, s.X_val, s.y_val)
    assert result.diverged and result.epochs_run < 3


def test_short_real_training_beats_chance(real_splits):
    s = real_splits.subset(3000, 1000)
    cfg = MLPConfig(hidden=[128], epochs=4, batch_size=64, dropout=0.1)
    result = ms.train(cfg, s.X_train, s.y_train, s.X_val, s.y_val)
    assert result.seconds < 30  # ~2 s on an idle 2-core machine; loose because the CPU may be shared
    assert ms.evaluate(result.model, s.X_test, s.y_test)["acc"] > 0.75  # chance is 0.10


def test_layer_statistics(synthetic_splits):
    model = MLP(784, [64, 32], 10, seed=0)
    stats = ms.layer_statistics(model, synthetic_splits.X_val, synthetic_splits.y_val)
    assert [s["layer"] for s in stats] == [1, 2]
    assert set(stats[0]) == {"layer", "act_mean", "act_std", "dead_frac", "grad_norm"}
    assert all(0 <= s["dead_frac"] <= 1 and s["grad_norm"] > 0 and s["act_std"] > 0 for s in stats)


# ---------------------------------------------------------------------------------- save / load
def test_save_load_round_trip_without_pickle(tmp_path):
    model = random_model([6, 5], "gelu", dropout=0.2, in_dim=784, out_dim=10).astype(np.float32)
    model.input_mean, model.input_std = 0.286, 0.353
    path = model.save(tmp_path / "mlp")
    assert path.suffix == ".npz"
    with np.load(path, allow_pickle=False) as f:  # raises if anything in it needs pickle
        assert set(f.files) == set(model.params) | {"meta"}
    loaded = MLP.load(path)
    assert (loaded.activation, loaded.hidden, loaded.dropout) == ("gelu", [6, 5], 0.2)
    assert (loaded.input_mean, loaded.input_std) == (0.286, 0.353)
    X = np.random.default_rng(0).random((20, 784), dtype=np.float32)
    np.testing.assert_array_equal(loaded.forward(X), model.forward(X))
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert loaded.n_params == model.n_params == 784 * 6 + 6 + 6 * 5 + 5 + 5 * 10 + 10


# ---------------------------------------------------------------------------------- command line
@pytest.mark.parametrize("argv,message", [
    (["--dropout", "1.5"], "--dropout"), (["--hidden", "0"], "--hidden"), (["--activation", "foo"], "foo"),
    (["--lr", "-1"], "--lr"), (["--epochs", "0"], "--epochs"), (["--optimizer", "rmsprop"], "rmsprop")])
def test_cli_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        ms.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in err and message in err


def test_cli_data_error_is_one_line(monkeypatch, capsys):
    import preprocessing

    def broken(*args, **kwargs):
        raise preprocessing.DataError("Fashion-MNIST not found in /nowhere")
    monkeypatch.setattr(preprocessing, "load_splits", broken)
    assert ms.main(["--epochs", "1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: Fashion-MNIST not found in /nowhere"]


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, "mlp_scratch.py", "--activation", "gelu", "--hidden", "32",
                           "--epochs", "2", "--batch-size", "64", "--subset", "1000", "--no-progress", "--json", str(out),
                           "--save", str(tmp_path / "m.npz")], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "epoch   2/2" in proc.stdout and "test acc" in proc.stdout
    result = json.loads(out.read_text())
    assert result["config"]["activation"] == "gelu" and result["val_acc"] > 0.6
    assert MLP.load(tmp_path / "m.npz").hidden == [32]


# -------------------------------------------------------------------------------------- no torch
def test_mlp_scratch_imports_no_framework():
    tree = ast.parse((REPO / "mlp_scratch.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    allowed = {"__future__", "argparse", "json", "math", "sys", "time", "dataclasses", "pathlib", "typing",
               "numpy", "preprocessing", "tqdm"}
    assert imported <= allowed, imported - allowed
    code = ("import sys, mlp_scratch, preprocessing; mlp_scratch.MLP(4, [3], 2).forward([[0.0] * 4]); "
            "bad = {'torch', 'tensorflow', 'jax', 'autograd'} & {m.split('.')[0] for m in sys.modules}; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
