"""Tests of mlp_scratch.py: finite differences and a torch autograd oracle for every layer, the loss and the
whole network; optimizers against torch.optim; training behaviour; input checks; save/load; the command
line; no torch in the module. The torch oracle is report/gradcheck.torch_twin."""
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
from report.gradcheck import torch_twin, twin_grads

REPO = Path(__file__).resolve().parents[1]
F64 = np.float64


# ----------------------------------------------------------------------------------------- helpers
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


def assert_grads(f, analytic: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """The one gradient check: for each name, (x, its analytic gradient) against central differences of the
    scalar f() in float64, relative error < 1e-6."""
    for name, (x, grad) in analytic.items():
        assert rel_error(grad, numeric_grad(f, x)) < 1e-6, name


def random_model(hidden, activation="relu", dropout=0.0, in_dim=7, out_dim=5, seed=0, standardize=False,
                 dtype=F64):
    """A model (float64 unless told) with random non-zero biases (zero biases hide bugs)."""
    model = MLP(in_dim, hidden, out_dim, activation, dropout, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    for k, p in model.params.items():
        if k.startswith("b"):
            p[...] = rng.normal(0, 0.5, p.shape)
    if standardize:
        model.input_mean, model.input_std = 0.3, 0.7
    return model


# ---------------------------------------------------------------------- finite differences (float64)
def layer_case(layer, n_out=None):
    """Checks layer's dx and parameter grads by finite differences (the loss sum(out * dout))."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1.5, (5, 4))
    dout = rng.normal(0, 1, (5, n_out or 4))

    def f():
        if isinstance(layer, ms.Dropout):
            layer.rng = np.random.default_rng(7)  # the same mask on every call
        return float((layer.forward(x, train=True) * dout).sum())

    f()
    dx = layer.backward(dout)
    params = getattr(layer, "params", {})
    assert_grads(f, {"x": (x, dx), **{k: (p, layer.grads[k]) for k, p in params.items()}})


def _linear():
    layer = ms.Linear(4, 3, rng=np.random.default_rng(1), dtype=F64)
    layer.params["b"][...] = np.random.default_rng(2).normal(0, 1, 3)
    return layer


LAYER_CASES = {
    "linear": lambda: layer_case(_linear(), n_out=3),
    "relu": lambda: layer_case(ms.ReLU()),
    "leaky_relu": lambda: layer_case(ms.LeakyReLU()),
    "tanh": lambda: layer_case(ms.Tanh()),
    "sigmoid": lambda: layer_case(ms.Sigmoid()),
    "gelu": lambda: layer_case(ms.GELU()),
    "dropout": lambda: layer_case(ms.Dropout(0.4, np.random.default_rng(0))),
    "standardize": lambda: layer_case(ms.Standardize(0.3, 0.7)),
}


@pytest.mark.parametrize("name", LAYER_CASES)
def test_layer_finite_differences(name):
    LAYER_CASES[name]()


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_loss_matches_finite_differences_and_torch(smoothing):
    rng = np.random.default_rng(3)
    logits, y = rng.normal(0, 3, (6, 5)), rng.integers(0, 5, 6)
    loss, dlogits = softmax_cross_entropy(logits, y, label_smoothing=smoothing)
    assert_grads(lambda: softmax_cross_entropy(logits, y, label_smoothing=smoothing)[0], {"logits": (logits, dlogits)})
    z = torch.tensor(logits, requires_grad=True)
    ref = F.cross_entropy(z, torch.tensor(y), label_smoothing=smoothing)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    assert rel_error(dlogits, z.grad.numpy()) < 1e-12


def test_softmax_matches_torch():
    z = np.random.default_rng(4).normal(0, 50, (6, 10))
    p = ms.softmax(z)
    np.testing.assert_allclose(p, torch.softmax(torch.tensor(z), dim=1).numpy(), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-14)


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

    dX = model.backward(softmax_cross_entropy(forward_fixed_masks(), y)[1])
    grads = {k: (p, model.grads[k]) for k, p in model.params.items()}
    assert_grads(lambda: softmax_cross_entropy(forward_fixed_masks(), y)[0], {"X": (X, dX), **grads})


# ------------------------------------------------------------------------------- torch oracle
def check_against_torch(model: MLP, X: np.ndarray, y: np.ndarray, train: bool = False) -> None:
    """Our forward, loss and every gradient against torch autograd on torch_twin(model) with, when train,
    the dropout masks our forward drew."""
    logits = model.forward(X, train=train)
    loss, dlogits = softmax_cross_entropy(logits, y)
    dX = model.backward(dlogits)
    masks = [layer.mask for layer in model.layers if isinstance(layer, ms.Dropout)] if train else None
    net = torch_twin(model, masks).train(train)
    tX = torch.tensor(X, requires_grad=True)
    t_logits = net(tX)
    t_loss = F.cross_entropy(t_logits, torch.tensor(y))
    t_loss.backward()
    np.testing.assert_allclose(logits, t_logits.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert loss == pytest.approx(t_loss.item(), rel=1e-12)
    np.testing.assert_allclose(dX, tX.grad.numpy(), rtol=1e-8, atol=1e-12)
    for k, g in twin_grads(net).items():
        np.testing.assert_allclose(model.grads[k], g, rtol=1e-8, atol=1e-12, err_msg=k)


ORACLE_DATA = np.random.default_rng(4).random((16, 7)), np.random.default_rng(5).integers(0, 5, 16)


@pytest.mark.parametrize("activation", ms.ACTIVATIONS)
@pytest.mark.parametrize("hidden", [[], [9], [9, 6], [8, 8, 8, 6]])
def test_torch_oracle(activation, hidden):
    check_against_torch(random_model(hidden, activation, standardize=True), *ORACLE_DATA)


@pytest.mark.parametrize("activation", ms.ACTIVATIONS)
def test_torch_oracle_dropout_fixed_mask(activation):
    check_against_torch(random_model([9, 6], activation, dropout=0.5), *ORACLE_DATA, train=True)


def test_backward_returns_fresh_gradients():
    """The grads of one backward are new arrays: the next backward leaves them as they were."""
    model = random_model([6, 5])
    X, y = ORACLE_DATA
    model.backward(softmax_cross_entropy(model.forward(X[:8]), y[:8])[1])
    first = model.grads
    kept = {k: g.copy() for k, g in first.items()}
    model.backward(softmax_cross_entropy(model.forward(X[8:]), y[8:])[1], need_dx=False)
    for k, g in first.items():
        np.testing.assert_array_equal(g, kept[k])
        assert not np.array_equal(model.grads[k], g), k


def test_oracle_float32_model():
    """The float32 model agrees with the float64 oracle to float32 precision."""
    model = random_model([32, 16], "gelu")
    model32 = MLP(7, [32, 16], 5, "gelu")
    model32.load_state(model.params)
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


# ------------------------------------------------------------------------------ init, dropout
@pytest.mark.parametrize("init,std", [("he", math.sqrt(2 / 600)), ("xavier", math.sqrt(2 / 1000)),
                                      ("random", 0.01)])
def test_inits_are_normal_with_the_shared_std(init, std):
    W = MLP(600, [400], 10, init=init).params["W1"].astype(F64)
    assert W.std() == pytest.approx(std, rel=0.02)
    kurtosis = ((W - W.mean()) ** 4).mean() / W.var() ** 2
    assert abs(kurtosis - 3.0) < 0.1  # normal: 3; a uniform init would give 1.8


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


def test_a_finite_loss_that_blew_up_is_divergence_too(synthetic_splits):
    assert ms.loss_blew_up(float("nan"), 10) and ms.loss_blew_up(float("inf"), 10) and ms.loss_blew_up(231.0, 10)
    assert not ms.loss_blew_up(230.0, 10) and not ms.loss_blew_up(2.3, 10)  # 100 ln 10 = 230.26
    s, logs = synthetic_splits, []
    cfg = MLPConfig(hidden=[64], activation="relu", optimizer="adamw", lr=3.0, epochs=3, schedule="constant",
                    warmup_epochs=0)
    with np.errstate(all="ignore"):
        result = ms.train(cfg, s.X_train, s.y_train, s.X_val, s.y_val, log=logs.append)
    assert result.diverged and result.epochs_run == 0 and result.best_epoch == 0
    blown = float(logs[-1].split("blew up (")[1].split(";")[0])
    assert math.isfinite(blown) and blown > 230  # finite: caught by its size, not by a NaN


def test_short_real_training_beats_chance(real_splits):
    s = real_splits.subset(3000, 1000)
    cfg = MLPConfig(hidden=[128], epochs=4, batch_size=64, dropout=0.1)
    result = ms.train(cfg, s.X_train, s.y_train, s.X_val, s.y_val)
    assert ms.evaluate(result.model, s.X_test, s.y_test)["acc"] > 0.75  # chance is 0.10


def test_layer_statistics(synthetic_splits):
    model = MLP(784, [64, 32], 10, seed=0)
    stats = ms.layer_statistics(model, synthetic_splits.X_val, synthetic_splits.y_val)
    assert [s["layer"] for s in stats] == [1, 2]
    assert set(stats[0]) == {"layer", "act_mean", "act_std", "dead_frac", "grad_norm"}
    assert all(0 <= s["dead_frac"] <= 1 and s["grad_norm"] > 0 and s["act_std"] > 0 for s in stats)


@pytest.mark.parametrize("activation,dead", [("relu", 0.25), ("leaky_relu", 0.0)])
def test_dead_unit_means_activation_exactly_zero_on_every_input(activation, dead):
    """Unit 0 of four gets a negative pre-activation on every input: ReLU outputs exactly 0 there (dead);
    leaky ReLU outputs a small negative number, so that unit is not dead."""
    model = MLP(3, [4], 2, activation=activation, dtype=F64)
    model.params["W1"][:, 0] = -1.0
    model.params["W1"][:, 1:] = 1.0
    X = np.random.default_rng(0).random((50, 3)) + 0.1
    assert ms.layer_statistics(model, X, np.zeros(50, int))[0]["dead_frac"] == dead


def test_config_validate_names_the_field():
    assert MLPConfig().validate() == MLPConfig()
    for bad in (dict(dropout=1.5), dict(hidden=[0]), dict(hidden=[ms.MAX_WIDTH + 1]), dict(lr=math.inf),
                dict(seed=-1), dict(warmup_epochs=math.nan), dict(optimizer="rmsprop"), dict(epochs=0)):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=f"^{name}: "):
            MLPConfig(**bad).validate()


# ------------------------------------------------------------------------------------ input checks
def pixel_model() -> MLP:
    model = MLP(784, [8], 10, input_range=ms.PIXEL_RANGE)
    model.input_mean, model.input_std = 0.286, 0.353
    return model


X_PIXELS = np.random.default_rng(0).random((6, 784), dtype=np.float32)


@pytest.mark.parametrize("make_bad,message", [
    (lambda X: (X * 255).astype(np.uint8), "divide uint8 images by 255"),
    (lambda X: X * 255, r"must be in \[0, 1\].*divide uint8 images by 255"),
    (lambda X: np.where(np.arange(784) == 3, np.nan, X).astype(np.float32), "NaN"),
    (lambda X: X.reshape(6, 28, 28)[:, :27], r"shape \(N, 784\), \(N, 28, 28\) or \(N, 1, 28, 28\), got \(6, 27, 28\)"),
    (lambda X: X.reshape(6, 784, 1), r"shape \(N, 784\)"),
    (lambda X: X[:, :783], r"shape \(N, 784\)")])
def test_predict_and_evaluate_refuse_bad_input(make_bad, message):
    model, X = pixel_model(), make_bad(X_PIXELS)
    with pytest.raises(ValueError, match=message):
        model.predict(X)
    with pytest.raises(ValueError, match=message):
        ms.evaluate(model, X, np.zeros(6, int))


def test_predict_takes_images_as_the_readme_says():
    model = pixel_model()
    expected = model.predict(X_PIXELS)
    for shape in [(6, 28, 28), (6, 1, 28, 28)]:
        np.testing.assert_array_equal(model.predict(X_PIXELS.reshape(shape)), expected)
    assert ms.evaluate(model, X_PIXELS.reshape(6, 28, 28), np.zeros(6, int)) == ms.evaluate(model, X_PIXELS,
                                                                                              np.zeros(6, int))


def test_feature_head_takes_values_above_one_but_not_nan():
    head = MLP(784, [8], 10)  # input_range None: features, not pixels
    assert head.predict(X_PIXELS * 50).shape == (6,)
    with pytest.raises(ValueError, match="NaN"):
        head.predict(np.full((2, 784), np.nan, np.float32))


def test_trained_pixel_model_keeps_its_range_through_save(synthetic_splits, tmp_path):
    s = synthetic_splits
    with pytest.raises(ValueError, match="255"):
        ms.train(MLPConfig(**TINY), s.X_train * 255, s.y_train, s.X_val, s.y_val, input_range=ms.PIXEL_RANGE)
    model = ms.train(MLPConfig(**{**TINY, "epochs": 1}), s.X_train, s.y_train, s.X_val, s.y_val,
                     input_range=ms.PIXEL_RANGE).model
    loaded = MLP.load(model.save(tmp_path / "m.npz"))
    assert loaded.input_range == ms.PIXEL_RANGE
    with pytest.raises(ValueError, match="255"):
        loaded.predict(s.X_val * 255)


# ---------------------------------------------------------------------------------- save / load
def test_save_load_round_trip_without_pickle(tmp_path):
    model = random_model([6, 5], "gelu", dropout=0.2, in_dim=784, out_dim=10, dtype=np.float32)
    model.input_mean, model.input_std = 0.286, 0.353
    path = model.save(tmp_path / "mlp")
    assert path.suffix == ".npz"
    with np.load(path, allow_pickle=False) as f:  # raises if anything in it needs pickle
        assert set(f.files) == set(model.params) | {"meta"}
    loaded = MLP.load(path)
    assert (loaded.activation, loaded.hidden, loaded.dropout) == ("gelu", [6, 5], 0.2)
    assert (loaded.input_mean, loaded.input_std, loaded.input_range) == (0.286, 0.353, None)
    X = np.random.default_rng(0).random((20, 784), dtype=np.float32)
    np.testing.assert_array_equal(loaded.forward(X), model.forward(X))
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert loaded.n_params == model.n_params == 784 * 6 + 6 + 6 * 5 + 5 + 5 * 10 + 10


def _tampered(tmp_path, **changes) -> Path:
    """A saved pixel model with some arrays or meta fields replaced."""
    path = pixel_model().save(tmp_path / "m.npz")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = {**json.loads(str(arrays["meta"])), **changes.pop("meta", {})}
    arrays.update(changes, meta=np.array(json.dumps(meta)))
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("changes,message", [
    (dict(W1=np.zeros((784, 9), np.float32)), r"W1 holds float32 values of shape \(784, 9\), expected .*\(784, 8\)"),
    (dict(b2=np.full(10, np.inf, np.float32)), "b2 holds float32 values of shape .*, expected finite"),
    (dict(meta={"input_std": 0.0}), "std > 0"),
    (dict(W2=np.array([object()], dtype=object)), "not a model written by MLP.save"),
    (dict(meta={"input_std": "big"}), "std > 0"),
    (dict(W1=np.ones((784, 8), np.int32)), "W1 holds int32 values .*, expected finite floating-point weights"),
    (dict(meta={"dtype": "int32"}), "dtype int32 is not floating point")])
def test_load_refuses_damaged_files_naming_them(tmp_path, changes, message):
    path = _tampered(tmp_path, **changes)
    with pytest.raises(ValueError, match=message) as exc:
        MLP.load(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


# ---------------------------------------------------------------------------------- command line
@pytest.fixture
def no_data(monkeypatch):
    """Reaching the data loading is a test failure: argument errors must stop before it."""
    import preprocessing

    def reached(*args, **kwargs):
        raise AssertionError("argument checks did not stop before loading the data")
    monkeypatch.setattr(preprocessing, "load_splits", reached)


@pytest.mark.parametrize("argv,message", [
    (["--dropout", "1.5"], "--dropout"), (["--hidden", "0"], "--hidden"), (["--activation", "foo"], "foo"),
    (["--lr", "-1"], "--lr"), (["--epochs", "0"], "--epochs"), (["--optimizer", "rmsprop"], "rmsprop"),
    (["--seed", "-1"], "--seed"), (["--hidden", "10000000000"], "--hidden"),
    (["--warmup-epochs", "inf"], "--warmup-epochs"), (["--lr", "nan"], "--lr"),
    (["--weight-decay", "inf"], "--weight-decay"), (["--epochs", "100000000"], "--epochs"),
    (["--save", ""], "--save: must not be empty"), (["--data-dir", " "], "--data-dir: must not be empty")])
def test_cli_rejects_bad_values(argv, message, capsys, no_data):
    with pytest.raises(SystemExit) as exc:
        ms.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in err and message in err


@pytest.mark.parametrize("flag", ["--save", "--json"])
def test_cli_refuses_unwritable_output_before_training(flag, tmp_path, capsys, no_data):
    (tmp_path / "a_file").write_text("")
    for target in (tmp_path / "a_file" / "out", tmp_path):  # below a file; a directory
        with pytest.raises(SystemExit) as exc:
            ms.main([flag, str(target)])
        assert exc.value.code == 2
        assert flag in capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_data_error_is_one_line(monkeypatch, capsys):
    import preprocessing

    def broken(*args, **kwargs):
        raise preprocessing.DataError("Fashion-MNIST not found in /nowhere")
    monkeypatch.setattr(preprocessing, "load_splits", broken)
    assert ms.main(["--epochs", "1"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == ["mlp_scratch.py: error: Fashion-MNIST not found in /nowhere"]


def test_cli_diverged_run_is_one_line_exit_3(monkeypatch, capsys, synthetic_splits):
    import preprocessing
    monkeypatch.setattr(preprocessing, "load_splits", lambda *a, **k: synthetic_splits)
    argv = ["--hidden", "64", "--optimizer", "sgd", "--lr", "1e8", "--schedule", "constant", "--warmup-epochs", "0",
            "--epochs", "2", "--no-progress"]
    assert ms.main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged" in err[0]


def test_cli_ctrl_c_is_one_line_exit_130(monkeypatch, capsys, synthetic_splits):
    import preprocessing

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(preprocessing, "load_splits", lambda *a, **k: synthetic_splits)
    monkeypatch.setattr(ms, "train", interrupted)
    assert ms.main(["--epochs", "1"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0]


def test_cli_out_of_memory_is_one_line(monkeypatch, capsys, synthetic_splits):
    import preprocessing

    def too_big(*args, **kwargs):
        raise MemoryError("Unable to allocate 32.0 GiB for an array with shape (65536, 65536)")
    monkeypatch.setattr(preprocessing, "load_splits", lambda *a, **k: synthetic_splits)
    monkeypatch.setattr(ms, "train", too_big)
    assert ms.main(["--epochs", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlp_scratch.py: error: out of memory (Unable to allocate 32.0 GiB")


def test_cli_save_on_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path):
    """A real write failure: under a 20 kB file-size limit (RLIMIT_FSIZE) writing the ~200 kB model fails with
    EFBIG. One line, exit 1, the previous x.npz untouched and no partial file left beside it."""
    target = tmp_path / "x.npz"
    target.write_bytes(b"the previous model")
    code = ("import resource, signal, sys, preprocessing, mlp_scratch; sys.path.insert(0, 'tests'); import conftest; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "preprocessing.load_splits = lambda *a, **k: conftest.make_synthetic_splits(); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
            f"sys.exit(mlp_scratch.main(['--hidden', '64', '--epochs', '1', '--save', {str(target)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1 and "File too large" in err[0], proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"] and target.read_bytes() == b"the previous model"


def test_cli_end_to_end_without_a_terminal_prints_no_bars(tmp_path):
    out = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, "mlp_scratch.py", "--activation", "gelu", "--hidden", "32",
                           "--epochs", "2", "--batch-size", "64", "--subset", "1000", "--json", str(out),
                           "--save", str(tmp_path / "m.npz")], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "epoch   1/2" in proc.stdout and "epoch   2/2" in proc.stdout and "test acc" in proc.stdout
    assert proc.stderr == ""  # stderr is a pipe here: no progress bar
    result = json.loads(out.read_text())
    assert result["config"]["activation"] == "gelu" and result["val_acc"] > 0.6
    loaded = MLP.load(tmp_path / "m.npz")
    assert loaded.hidden == [32] and loaded.input_range == ms.PIXEL_RANGE


# -------------------------------------------------------------------------------------- no torch
FRAMEWORKS = {"torch", "tensorflow", "jax", "autograd"}


def test_mlp_scratch_imports_no_framework():
    """Neither in its source (an import inside a function included) nor when it runs: the module, what it
    imports and a forward pass leave no autograd framework loaded."""
    tree = ast.parse((REPO / "mlp_scratch.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & FRAMEWORKS, imported & FRAMEWORKS
    code = ("import sys, mlp_scratch; mlp_scratch.MLP(4, [3], 2).forward([[0.0] * 4]); "
            f"bad = {FRAMEWORKS!r} & {{m.split('.')[0] for m in sys.modules}}; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
