"""cnn_torch.py: architecture, initialisation, the torch <-> numpy gradient bridge, training, checkpoints, CLI."""
import copy
import itertools
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cnn_torch
import mlp_scratch
import preprocessing
from cnn_torch import CNNBackbone, CNNConfig
from conftest import file_size_limit, make_synthetic_splits
from report.gradcheck import torch_twin, twin_grads


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The test models are tiny: one thread beats two (no sync) and keeps a shared machine responsive."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

FILTER_CASES = [("constant", 4, [4] * 5), ("double", 2, [2, 4, 8, 16, 32]), ("6,4,8,8,12", 99, [6, 4, 8, 8, 12])]


def tiny_config(**kw) -> CNNConfig:
    """A configuration small enough for a test to train in seconds."""
    # Every architecture field is pinned, so the tests do not follow CNNConfig's chosen defaults.
    base = dict(filters="constant", base_filters=8, kernel_size=3, pool="max", init="he", head_mode="joint",
                head_hidden=[32], head_activation="relu", head_dropout=0.0, epochs=1, batch_size=32,
                augment=False, erase=0.0, label_smoothing=0.0, tta=False, device="cpu", lr=3e-3, head_lr=3e-3,
                precision="fp32", weight_decay=5e-4)
    base.update(kw)
    return CNNConfig(**base)


def small_splits(n_train: int, n_eval: int, seed: int = 0) -> preprocessing.Splits:
    return make_synthetic_splits(n_train=n_train, n_eval=n_eval, seed=seed)


def backbone_of(**kw) -> CNNBackbone:
    """A backbone of CNNConfig's defaults with the given fields changed."""
    mean, std = kw.pop("input_mean", 0.0), kw.pop("input_std", 1.0)
    return CNNBackbone(CNNConfig(**kw), mean, std)


# --- architecture --------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool,kernel,filters", list(itertools.product(
    cnn_torch.POOLS, cnn_torch.KERNELS, FILTER_CASES)))
def test_feature_shape_every_combination(pool, kernel, filters):
    schedule, base, channels = filters
    net = backbone_of(filters=schedule, kernel_size=kernel, pool=pool, base_filters=base)
    assert net.channels == channels
    expected_dim = channels[-1] * (1 if pool == "gap" else 3 * 3)  # 28 -> 14 -> 7 -> 3 (or global)
    assert net.feature_dim == expected_dim
    out = net(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, expected_dim)


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("pool", cnn_torch.POOLS)
def test_five_convs_each_followed_by_relu(batchnorm, pool):
    net = backbone_of(filters="constant", pool=pool, batchnorm=batchnorm, base_filters=4)
    all_convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(all_convs) == 5
    mods = list(net.layers)
    conv_at = [i for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]
    assert len(conv_at) == 5
    for i in conv_at:
        conv, nxt = mods[i], mods[i + 1]
        assert conv.padding == (conv.kernel_size[0] // 2,) * 2  # 'same'
        if batchnorm:
            assert isinstance(nxt, nn.BatchNorm2d)
            nxt = mods[i + 2]
        assert isinstance(nxt, nn.ReLU)
    pools = [m for m in mods if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d))]
    assert len(pools) == 3
    if pool == "avg":
        assert all(isinstance(p, nn.AvgPool2d) for p in pools)
    else:
        assert all(isinstance(p, nn.MaxPool2d) for p in pools[:2])
        assert isinstance(pools[2], nn.AdaptiveAvgPool2d if pool == "gap" else nn.MaxPool2d)


def test_pool_variants_share_the_convolutions():
    """Same convolution shapes and compute in all three variants: only the pooling differs."""
    nets = {p: backbone_of(filters="32,32,64,64,128", pool=p) for p in cnn_torch.POOLS}
    shapes = {p: [tuple(m.weight.shape) for m in n.modules() if isinstance(m, nn.Conv2d)] for p, n in nets.items()}
    assert shapes["max"] == shapes["avg"] == shapes["gap"]
    assert len({n.conv_macs() for n in nets.values()}) == 1
    table = cnn_torch.describe()
    assert all(f"| {p} |" in table for p in cnn_torch.POOLS)


def test_backbone_follows_the_config_defaults():
    """One set of defaults: the backbone of CNNConfig() is the configured one (filters, BN, init, kernel)."""
    d = CNNConfig()
    net = CNNBackbone(d)
    assert net.channels == cnn_torch.parse_filters(d.filters, d.base_filters) and len(net.channels) == 5
    assert net.init == d.init and d.kernel_size == net.kernel_size
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == (5 if d.batchnorm else 0)
    assert cnn_torch.build_backbone(d).feature_dim == net.feature_dim == net.channels[-1] * (3 * 3 if d.pool != "gap" else 1)


def test_same_seed_same_weights_and_checkpoint_keys():
    """build_backbone draws the weights from the seed alone; the state_dict keys are those of the committed
    checkpoints (layers.<i>.*), so results/models/cnn_best still loads."""
    a, b = (cnn_torch.build_backbone(CNNConfig(seed=3)).state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.weight"], cnn_torch.build_backbone(CNNConfig(seed=4)).state_dict()["layers.0.weight"])
    committed = Path(__file__).resolve().parents[1] / "results" / "models" / "cnn_best"
    config = json.loads((committed / "config.json").read_text())["config"]
    assert set(torch.load(committed / "backbone.pt", weights_only=True)) == set(CNNBackbone(CNNConfig(**config)).state_dict())


def test_kernel_size_one_is_a_level():
    net = backbone_of(kernel_size=1, filters="constant", base_filters=4)
    assert 1 in cnn_torch.KERNELS and net(torch.rand(2, 1, 28, 28)).shape == (2, net.feature_dim)
    assert net.conv_macs() == sum(s * s * o * i for s, i, o in zip((28, 28, 14, 14, 7), (1, 4, 4, 4, 4), [4] * 5))


@pytest.mark.parametrize("spec", ["", "1,2,3", "a,b,c,d,e", "0,8,8,8,8", "tripple", "8,8,8,8,100000"])
def test_bad_filter_specs_raise(spec):
    with pytest.raises(ValueError):
        cnn_torch.parse_filters(spec, 8)


# --- initialisation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", cnn_torch.INITS)
def test_init_std_matches_formula(init):
    torch.manual_seed(0)
    k = 5
    net = backbone_of(filters="constant", kernel_size=k, init=init, base_filters=48, batchnorm=False)
    for conv in (m for m in net.modules() if isinstance(m, nn.Conv2d)):
        fan_in = conv.in_channels * k * k
        fan_out = conv.out_channels * k * k
        expected = {"random": 0.01, "xavier": math.sqrt(2.0 / (fan_in + fan_out)),
                    "he": math.sqrt(2.0 / fan_in)}[init]
        std = conv.weight.std().item()
        assert abs(std - expected) <= 0.10 * expected, (init, conv, std, expected)
        assert abs(conv.weight.mean().item()) < 0.1 * expected
        assert torch.count_nonzero(conv.bias) == 0


def test_init_statistics_rows():
    s = small_splits(64, 10)
    rows = cnn_torch.init_statistics(tiny_config(init="random", batchnorm=False),
                                     preprocessing.to_images(s.X_train), s.y_train)
    assert [r["layer"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert set(r) == {"layer", "act_mean", "act_std", "dead_frac", "grad_norm"}
        assert all(math.isfinite(v) for v in r.values())
    # N(0, 0.01^2) without BatchNorm shrinks the signal layer after layer: the point of the init study.
    assert rows[-1]["act_std"] < 1e-2 * rows[0]["act_std"]
    # ... and BatchNorm restores it (the study compares init with and without BN).
    with_bn = cnn_torch.init_statistics(tiny_config(init="random", batchnorm=True),
                                        preprocessing.to_images(s.X_train), s.y_train)
    assert all(0.2 < r["act_std"] < 2.0 and 0.0 <= r["dead_frac"] <= 1.0 for r in with_bn)


def test_dead_units_are_exactly_zero_for_every_input(monkeypatch):
    """A unit is dead when its activation is exactly 0 on every input: a conv whose weights and bias are
    all negative on non-negative inputs kills every unit of layer 1, and nothing else is called dead."""
    real_build = cnn_torch.build_backbone

    def build(config, mean, std):
        net = real_build(config, 0.0, 1.0)  # no standardisation: inputs stay >= 0
        conv = net.layers[0]
        with torch.no_grad():
            conv.weight.abs_().neg_()
            conv.bias.fill_(-0.1)
        return net
    monkeypatch.setattr(cnn_torch, "build_backbone", build)
    s = small_splits(32, 10)
    rows = cnn_torch.init_statistics(tiny_config(batchnorm=False), preprocessing.to_images(s.X_train), s.y_train)
    assert rows[0]["dead_frac"] == 1.0 and rows[0]["act_std"] == 0.0


# --- the gradient bridge -------------------------------------------------------------------------------
@pytest.mark.parametrize("batchnorm,pool,smoothing", [(False, "max", 0.0), (True, "gap", 0.0), (True, "avg", 0.1)])
def test_joint_step_gradients_equal_all_torch_twin(batchnorm, pool, smoothing):
    torch.manual_seed(0)
    backbone = backbone_of(filters="6,8,8,12,16", pool=pool, batchnorm=batchnorm, init="he",
                           input_mean=0.28, input_std=0.35)
    head = mlp_scratch.MLP(backbone.feature_dim, [24], 10, activation="relu", dropout=0.0, seed=1)
    rng = np.random.default_rng(0)
    for k in head.params:  # non-zero biases: zeros would hide a missing term
        if k.startswith("b"):
            head.params[k][...] = rng.normal(0, 0.1, head.params[k].shape)
    twin_backbone = copy.deepcopy(backbone)
    twin_head = torch_twin(head)
    x = torch.rand(16, 1, 28, 28)
    y = rng.integers(0, 10, 16)

    cfg = tiny_config(label_smoothing=smoothing, lr=1e-3, head_lr=1e-3)
    opt = cnn_torch.make_torch_optimizer(cfg, list(backbone.named_parameters()), cfg.lr)
    backbone.train()
    loss, logits = cnn_torch.train_step(backbone, cnn_torch.ScratchHead(head, cfg), opt, x, torch.from_numpy(y),
                                        cfg)

    twin_backbone.train()
    twin_logits = twin_head(twin_backbone(x))
    twin_loss = F.cross_entropy(twin_logits, torch.from_numpy(y), label_smoothing=smoothing)
    twin_loss.backward()

    assert loss.item() == pytest.approx(twin_loss.item(), rel=1e-5)
    np.testing.assert_allclose(logits.numpy(), twin_logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    for (name, p), (_, q) in zip(backbone.named_parameters(), twin_backbone.named_parameters()):
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    # The head's hand-written grads (taken before its step) equal torch's too.
    for k, g in twin_grads(twin_head).items():
        np.testing.assert_allclose(head.grads[k], g, rtol=1e-4, atol=1e-6, err_msg=k)
    # ... and both optimizers stepped.
    assert not torch.equal(next(backbone.parameters()), next(twin_backbone.parameters()))


def test_linear_head_sends_the_same_gradient_as_torch():
    """Frozen mode's temporary torch head goes through the same bridge: the backbone's grads equal autograd's."""
    torch.manual_seed(0)
    cfg = tiny_config(label_smoothing=0.1)
    backbone = backbone_of(filters="4,4,8,8,8", batchnorm=False, init="he")
    twin = copy.deepcopy(backbone)
    head = cnn_torch.LinearHead(cfg, backbone.feature_dim, torch.device("cpu"))
    twin_linear = copy.deepcopy(head.model)
    x, y = torch.rand(8, 1, 28, 28), np.arange(8) % 10
    loss, _ = cnn_torch.forward_backward(backbone, head, x, torch.from_numpy(y), label_smoothing=0.1)
    twin_loss = F.cross_entropy(twin_linear(twin(x)), torch.from_numpy(y), label_smoothing=0.1)
    twin_loss.backward()
    assert loss.item() == pytest.approx(twin_loss.item(), rel=1e-6)
    for p, q in zip(backbone.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_onecycle_is_the_shared_cosine_schedule_with_a_quarter_warmup():
    total = 40
    onecycle = cnn_torch.lr_scale_schedule(tiny_config(schedule="onecycle"), total)
    cosine = cnn_torch.lr_scale_schedule(tiny_config(schedule="cosine"), total)
    reference = mlp_scratch.make_schedule("cosine", 1.0, total, warmup_steps=10)
    assert [onecycle(t) for t in range(total)] == [reference(t) for t in range(total)]
    assert [cosine(t) for t in range(total)] == [mlp_scratch.make_schedule("cosine", 1.0, total)(t)
                                                 for t in range(total)]
    assert max(range(total), key=onecycle) == 9 and cosine(0) == 1.0


def test_training_holds_blas_at_one_thread(monkeypatch):
    """While train() runs, numpy's BLAS is held at one thread (threadpoolctl), and restored afterwards."""
    from threadpoolctl import threadpool_info
    blas = lambda: [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]  # noqa: E731
    before = blas()
    assert before, "numpy should load a BLAS that threadpoolctl can see"
    seen = []
    real = cnn_torch.ScratchHead.forward_backward

    def spy(self, *a, **kw):
        seen.append(blas())
        return real(self, *a, **kw)
    monkeypatch.setattr(cnn_torch.ScratchHead, "forward_backward", spy)
    threads = torch.get_num_threads()
    cnn_torch.train(tiny_config(), small_splits(64, 10))
    assert seen and all(all(n == 1 for n in t) for t in seen)
    assert blas() == before and torch.get_num_threads() == threads  # train() leaves torch's count alone


# --- augmentation --------------------------------------------------------------------------------------
def test_augment_batch_is_a_shifted_or_flipped_copy():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    same = cnn_torch.augment_batch(x, gen, pad=0)
    for a, b in zip(same, x):  # with no padding only the flip remains
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    out = cnn_torch.augment_batch(x, gen, pad=2)
    assert out.shape == x.shape
    # A 24x24 centre patch survives any shift of <= 2 pixels, possibly flipped.
    img = torch.zeros(1, 1, 28, 28)
    img[..., 6:22, 10:18] = 1.0
    aug = cnn_torch.augment_batch(img.repeat(200, 1, 1, 1), gen, pad=2)
    assert torch.allclose(aug.sum(dim=(1, 2, 3)), img.sum().expand(200))
    assert len({tuple(a.nonzero()[0].tolist()) for a in aug}) > 5  # the shifts differ between images


def test_erase_batch_zeroes_one_bounded_rectangle_per_chosen_image():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(300, 1, 28, 28) + 0.5  # no pixel is 0 before erasing
    out = cnn_torch.erase_batch(x, gen, prob=1.0, min_side=4, max_side=16)
    for a, b in zip(out, x):
        erased = (a[0] == 0)
        rows, cols = erased.any(dim=1).nonzero()[:, 0], erased.any(dim=0).nonzero()[:, 0]
        h, w = len(rows), len(cols)
        assert 4 <= h <= 16 and 4 <= w <= 16
        assert int(erased.sum()) == h * w                                   # one solid rectangle
        assert rows.max() - rows.min() + 1 == h and cols.max() - cols.min() + 1 == w
        assert torch.equal(a[0][~erased], b[0][~erased])                  # the rest untouched
    half = cnn_torch.erase_batch(x, gen, prob=0.5)
    frac = (half == 0).flatten(1).any(dim=1).float().mean().item()
    assert 0.4 < frac < 0.6
    assert torch.equal(cnn_torch.erase_batch(x, gen, prob=0.0), x)
    again = cnn_torch.erase_batch(x, torch.Generator().manual_seed(0), prob=1.0)
    assert torch.equal(again, out)  # the generator decides everything


def test_mean_softmax_logits_average_the_probabilities():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 3, (5, 10)), rng.normal(0, 3, (5, 10))
    z = cnn_torch.mean_softmax_logits(a, b)
    softmax = lambda v: np.exp(v - v.max(1, keepdims=True)) / np.exp(v - v.max(1, keepdims=True)).sum(1, keepdims=True)
    np.testing.assert_allclose(softmax(z), (softmax(a) + softmax(b)) / 2, rtol=1e-12)
    huge = cnn_torch.mean_softmax_logits(a * 1e4, b * 1e4)
    assert np.isfinite(huge).all()


def test_tta_prediction_is_mirror_symmetric():
    s = small_splits(96, 40)
    clf = cnn_torch.train(tiny_config(), s).classifier
    images = preprocessing.to_images(s.X_test)
    mirrored = images[..., ::-1].copy()
    plain = clf.logits(images)
    assert not np.allclose(plain, clf.logits(mirrored), atol=1e-4)  # the model itself is not symmetric
    clf.config.tta = True
    np.testing.assert_allclose(clf.logits(images), clf.logits(mirrored), rtol=1e-5, atol=1e-5)
    proba = clf.predict_proba(images)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)


def test_training_with_erasing_smoothing_and_tta_runs():
    s = small_splits(96, 40)
    for head_mode in ("joint", "frozen"):
        result = cnn_torch.train(tiny_config(erase=0.5, label_smoothing=0.1, tta=True, head_mode=head_mode,
                                             head_epochs=1), s)
        assert not result.diverged and np.isfinite([r["val_loss"] for r in result.history]).all()


# --- training ------------------------------------------------------------------------------------------
def test_overfits_a_few_batches(real_splits):
    s = real_splits.subset(96, 10)
    few = preprocessing.Splits(s.X_train, s.y_train, s.X_train, s.y_train, s.X_test, s.y_test)
    cfg = tiny_config(epochs=25, batch_size=32, lr=5e-3, head_lr=5e-3, batchnorm=True)
    result = cnn_torch.train(cfg, few)
    acc = cnn_torch.evaluate_classifier(result.classifier, preprocessing.to_images(s.X_train), s.y_train)["acc"]
    assert acc >= 0.98
    assert not result.diverged
    assert result.history[-1]["train_loss"] < 0.5 * result.history[0]["train_loss"]


def test_training_is_deterministic_and_reports_history():
    s = small_splits(128, 40)
    cfg = tiny_config(augment=True, head_dropout=0.2, epochs=2)
    a, b = cnn_torch.train(cfg, s), cnn_torch.train(cfg, s)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    keys = {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"}
    assert keys <= set(a.history[0])
    assert a.epochs_run == 2 and 1 <= a.best_epoch <= 2 and a.device == "cpu"
    assert a.n_params == a.classifier.backbone.n_params + a.classifier.head.n_params


@pytest.mark.parametrize("head_mode", cnn_torch.HEAD_MODES)
def test_bf16_training_runs(head_mode):
    s = small_splits(64, 20)
    result = cnn_torch.train(tiny_config(precision="bf16", channels_last=True, head_mode=head_mode, head_epochs=1), s)
    assert np.isfinite(result.history[0]["train_loss"]) and result.classifier.predict(
        preprocessing.to_images(s.X_val)).shape == (20,)


def test_divergence_is_reported_not_raised():
    s = small_splits(64, 20)
    result = cnn_torch.train(tiny_config(lr=1e6, head_lr=1e6, optimizer="sgd", epochs=3), s)
    assert result.diverged
    assert np.isfinite(result.classifier.predict_proba(preprocessing.to_images(s.X_val[:5]))).all()


def test_frozen_head_mode():
    s = small_splits(128, 40)
    result = cnn_torch.train(tiny_config(head_mode="frozen", head_epochs=2), s)
    phases = [r["phase"] for r in result.history]
    assert phases == ["backbone", "head", "head"]
    assert isinstance(result.classifier.head, mlp_scratch.MLP)
    feats = result.classifier.features(preprocessing.to_images(s.X_val))
    assert feats.shape == (40, result.classifier.backbone.feature_dim) and feats.dtype == np.float32


def test_with_a_weight_average_only_the_epochs_in_its_horizon_are_validated():
    s = small_splits(128, 40)
    for ema, validated in ((0.25, [False, False, True, True]), (0.0, [True] * 4)):  # ema 0.25 of 4 epochs: 3, 4
        result = cnn_torch.train(tiny_config(head_mode="frozen", head_epochs=1, epochs=4, ema=ema), s)
        backbone = [r for r in result.history if r["phase"] == "backbone"]
        assert [bool(np.isfinite(r["val_acc"])) for r in backbone] == validated and not result.diverged
    lines = []  # an epoch left unvalidated still catches a blow-up, from the training loss
    result = cnn_torch.train(tiny_config(head_mode="frozen", epochs=4, ema=0.25, lr=1e6, optimizer="sgd"), s,
                             log=lines.append)
    assert result.diverged and result.epochs_run < 3 and "the training loss blew up" in lines[-1]


# --- checkpoints and the command line ------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path):
    s = small_splits(96, 40)
    clf = cnn_torch.train(tiny_config(pool="gap", batchnorm=True), s).classifier
    clf.save(tmp_path / "ck")
    assert {p.name for p in (tmp_path / "ck").iterdir()} == {"backbone.pt", "head.npz", "config.json"}
    loaded = cnn_torch.load_classifier(tmp_path / "ck")
    images = preprocessing.to_images(s.X_test)
    np.testing.assert_array_equal(loaded.predict(images), clf.predict(images))
    np.testing.assert_array_equal(loaded.predict_proba(images), clf.predict_proba(images))
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["config"]["pool"] == "gap"


@pytest.mark.parametrize("argv,word", [
    (["--pool", "median"], "--pool"),
    (["--kernel-size", "4"], "--kernel-size"),
    (["--filters", "8,8"], "--filters"),
    (["--head-dropout", "1.5"], "--head-dropout"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--erase", "1.5"], "--erase"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--json", ""], "--json: must not be empty"),
    (["--threads", "0"], "--threads"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
])
def test_bad_flags_exit_with_a_message(argv, word, capsys):
    with pytest.raises(SystemExit) as exc:
        cnn_torch.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert word in err[-1] and err[-1].startswith("usage") is False


def test_describe_flag_prints_the_pooling_table_of_the_configured_net(capsys):
    """One row per pooling variant of the net the other flags configure: feature size, parameters, compute."""
    assert cnn_torch.main(["--describe", "--filters", "constant", "--base-filters", "4", "--head-hidden", "8"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "pool" not in line}
    nets = {p: backbone_of(filters="constant", base_filters=4, pool=p) for p in cnn_torch.POOLS}
    assert rows == {p: [str(n.feature_dim), f"{n.n_params:,}", f"{n.feature_dim * 8 + 8 + 8 * 10 + 10:,}",
                        f"{n.conv_macs() / 1e6:.1f}"] for p, n in nets.items()}
    assert rows["gap"][0] == "4" and rows["max"][0] == rows["avg"][0] == "36"  # 4 channels x 3 x 3


@pytest.fixture
def checkpoint(saved_classifier, tmp_path) -> Path:
    """A fresh copy of a saved tiny classifier, to damage."""
    return Path(shutil.copytree(saved_classifier[3], tmp_path / "ck"))


def test_checkpoint_with_a_pickle_is_refused(checkpoint):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, checkpoint / "backbone.pt")
    with pytest.raises(ValueError, match="backbone.pt: not written by CNNClassifier.save") as exc:
        cnn_torch.load_classifier(checkpoint)
    assert "pwned" not in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("file, damage", [
    ("config.json", lambda p: p.write_text('{"broken')),
    ("config.json", lambda p: p.write_text('{"config": [1, 2]}')),
    ("config.json", lambda p: p.write_text('{"config": {"lr": -1}, "feature_dim": 1}')),
    ("backbone.pt", lambda p: p.write_bytes(p.read_bytes()[:200])),
    ("backbone.pt", lambda p: torch.save({"conv.weight": torch.zeros(3)}, p)),
])
def test_a_damaged_checkpoint_file_is_named_in_one_line(checkpoint, file, damage):
    damage(checkpoint / file)
    with pytest.raises(ValueError, match=f"{file}: not written by CNNClassifier.save") as exc:
        cnn_torch.load_classifier(checkpoint)
    assert "\n" not in str(exc.value)


def test_a_nan_weight_in_the_backbone_is_refused(checkpoint):
    """One NaN weight would make every prediction class 0: the file is refused, named."""
    state = torch.load(checkpoint / "backbone.pt", weights_only=True)
    state["layers.3.weight"][0, 0, 1, 1] = float("nan")
    torch.save(state, checkpoint / "backbone.pt")
    with pytest.raises(ValueError, match=r"backbone\.pt: layers\.3\.weight holds NaN") as exc:
        cnn_torch.load_classifier(checkpoint)
    assert str(checkpoint) in str(exc.value)


@pytest.mark.parametrize("file", cnn_torch.CHECKPOINT_FILES)
def test_a_missing_checkpoint_file_is_named(checkpoint, file):
    (checkpoint / file).unlink()
    with pytest.raises(ValueError, match=f"{file}: missing") as exc:
        cnn_torch.load_classifier(checkpoint)
    assert str(checkpoint / file) in str(exc.value) and "\n" not in str(exc.value)


def test_save_replaces_a_checkpoint_but_not_a_folder_of_other_files(saved_classifier, checkpoint):
    clf = saved_classifier[0]
    clf.save(checkpoint)  # an old checkpoint is replaced as a whole
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["ck"]
    (checkpoint / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        clf.save(checkpoint)
    assert (checkpoint / "notes.txt").read_text() == "mine"


# --- input validation ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_classifier(tmp_path_factory):
    s = small_splits(64, 20)
    clf = cnn_torch.train(tiny_config(), s).classifier
    path = clf.save(tmp_path_factory.mktemp("clf") / "ck")
    return clf, cnn_torch.load_classifier(path), preprocessing.to_images(s.X_val), path


def _bad_images(images):
    nan = images.copy()
    nan[0, 0, 3, 3] = np.nan
    inf = images.copy()
    inf[1, 0, 0, 0] = np.inf
    return {"uint8": (images * 255).astype(np.uint8), "int64": (images * 255).astype(np.int64),
            "0-255 floats": images * 255.0, "negative": images - 0.5, "nan": nan, "inf": inf,
            "wrong shape": images.reshape(len(images), 2, 392), "one unbatched image": images[0, 0],
            "3 channels": np.repeat(images, 3, axis=1)}


@pytest.mark.parametrize("case", list(_bad_images(np.zeros((4, 1, 28, 28), np.float32))))
def test_bad_images_are_refused_everywhere(saved_classifier, case):
    clf, loaded, images, _ = saved_classifier
    bad = _bad_images(images)[case]
    calls = [clf.predict, clf.predict_proba, clf.features, clf.logits, loaded.predict,
             lambda x: cnn_torch.evaluate_classifier(clf, x, np.zeros(len(x), np.int64))]
    for call in calls:
        for x in (bad, torch.from_numpy(np.ascontiguousarray(bad))):  # numpy arrays and tensors alike
            with pytest.raises(ValueError, match=r"divide uint8 images by 255"):
                call(x)


@pytest.mark.parametrize("bad", ["images.png", None, ["a", "b"], 3.0, {"x": 1}])
def test_predict_on_what_is_not_an_array_of_images_is_one_value_error(saved_classifier, bad):
    clf = saved_classifier[1]
    for call in (clf.predict, clf.predict_proba):
        with pytest.raises(ValueError, match="expected floating-point images"):
            call(bad)


def test_good_images_in_every_accepted_shape(saved_classifier):
    clf, loaded, images, _ = saved_classifier
    expected = clf.predict(images)
    for x in (images, images.reshape(len(images), 28, 28), images.reshape(len(images), -1),
              images.astype(np.float64), torch.from_numpy(images)):
        np.testing.assert_array_equal(loaded.predict(x), expected)
    assert clf.features(images[:0]).shape == (0, clf.backbone.feature_dim)


# --- the command line: faults give one line and an exit code ------------------------------------------------
@pytest.mark.parametrize("argv,word", [
    (["--weight-decay", "inf"], "finite"),
    (["--weight-decay", "nan"], "finite"),
    (["--lr", "nan"], "finite"),
    (["--seed", "-1"], "seed"),
    (["--base-filters", "100000"], "--base-filters"),
    (["--filters", "8,8,8,8,100000"], "--filters"),
    (["--head-hidden", "10000000000"], "--head-hidden"),
    (["--batch-size", "100000000"], "--batch-size"),
    (["--epochs", "1000000000"], "--epochs"),
])
def test_absurd_values_are_refused_before_anything_runs(argv, word, capsys, monkeypatch):
    monkeypatch.setattr(preprocessing, "load_splits", lambda *a, **k: pytest.fail("data loaded"))
    with pytest.raises(SystemExit) as exc:
        cnn_torch.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert word in err[-1] and "Traceback" not in "".join(err)


@pytest.fixture
def fake_data(monkeypatch):
    """The CLI on tiny synthetic data: load_splits returns it."""
    s = small_splits(64, 20)
    monkeypatch.setattr(preprocessing, "load_splits", lambda *a, **k: s)
    return s


TINY_ARGS = ["--filters", "constant", "--base-filters", "4", "--head-hidden", "16", "--head-mode", "joint",
             "--epochs", "2", "--batch-size", "32", "--precision", "fp32", "--device", "cpu", "--no-augment",
             "--erase", "0", "--head-epochs", "1"]


@pytest.mark.parametrize("flag", ["--save", "--json"])
def test_unwritable_outputs_are_refused_before_training(flag, tmp_path, capsys, monkeypatch, fake_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setattr(cnn_torch, "train", lambda *a, **k: pytest.fail("trained before checking the path"))
    with pytest.raises(SystemExit) as exc:
        cnn_torch.main(TINY_ARGS + [flag, str(blocker / "sub" / "out.json")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"{flag}: {blocker} is a file, not a folder "
                                                                     "(see --help)")


def test_cli_writes_outputs_and_one_line_per_epoch_without_a_terminal(tmp_path, capsys, fake_data):
    out = tmp_path / "r" / "m.json"
    assert cnn_torch.main(TINY_ARGS + ["--save", str(tmp_path / "ck"), "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "it/s" not in captured.err  # no progress-bar redraws in a log
    assert sum(line.startswith("[joint] epoch") for line in captured.out.splitlines()) == 2
    assert json.loads(out.read_text())["epochs_run"] == 2
    assert cnn_torch.load_classifier(tmp_path / "ck").predict(preprocessing.to_images(fake_data.X_val)).shape == (20,)


@pytest.mark.filterwarnings("error")  # a warning would be more lines on a user's terminal
def test_diverged_run_prints_one_line_and_exits_3(tmp_path, capsys, fake_data):
    argv = TINY_ARGS + ["--lr", "1e6", "--head-lr", "1e6", "--optimizer", "sgd", "--json", str(tmp_path / "m.json")]
    assert cnn_torch.main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged" in err[0]
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("error", [MemoryError("Unable to allocate 32.0 GiB"),
                                   torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB\nmore")])
def test_out_of_memory_prints_one_line_and_exits_1(capsys, monkeypatch, fake_data, error):
    def too_big(*a, **k):
        raise error
    monkeypatch.setattr(cnn_torch, "train", too_big)
    assert cnn_torch.main(TINY_ARGS) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cnn_torch.py: error: out of memory (") and "--batch-size" in err[0]


def test_a_subset_larger_than_the_training_set_is_refused(capsys, fake_data):
    assert cnn_torch.main(TINY_ARGS + ["--subset", "100"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cnn_torch.py: error: subset 100 is more than the 64 training images"]


def test_save_into_a_folder_of_other_files_is_refused_before_training(tmp_path, capsys, monkeypatch, fake_data):
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.setattr(cnn_torch, "train", lambda *a, **k: pytest.fail("trained before checking the path"))
    with pytest.raises(SystemExit) as exc:
        cnn_torch.main(TINY_ARGS + ["--save", str(tmp_path)])
    assert exc.value.code == 2 and "holds other files (keep.txt)" in capsys.readouterr().err


REPO = Path(__file__).resolve().parents[1]


def run_cli_limited(args: list[str], limit: int, value: int, n_train: int = 64) -> subprocess.CompletedProcess:
    """cnn_torch.py's main in a fresh process on synthetic data (load_splits replaced), under a resource
    limit: a real allocation failure (RLIMIT_AS) or a real full disk (RLIMIT_FSIZE: writes fail with EFBIG)."""
    code = ("import sys, preprocessing, cnn_torch; sys.path.insert(0, 'tests'); import conftest; "
            "preprocessing.load_splits = lambda *a, **k: "
            f"conftest.make_synthetic_splits({n_train}, 20); sys.exit(cnn_torch.main(sys.argv[1:]))")

    def limit_child():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a signal
        resource.setrlimit(limit, (value, value))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, preexec_fn=limit_child,
                          capture_output=True, text=True, timeout=300)


def test_out_of_memory_for_real_is_one_line():
    """2048 filters on 4096 images of 28x28 (a 26 GB activation): torch's CPU allocator fails (a plain
    RuntimeError) under a 4 GB limit. The other layers are small, so that building the net takes no time."""
    args = ["--filters", "8,2048,8,8,8", "--batch-size", "4096", "--head-hidden", "16", "--epochs", "1",
            "--precision", "fp32", "--device", "cpu", "--head-mode", "joint", "--no-augment", "--erase", "0"]
    run = run_cli_limited(args, resource.RLIMIT_AS, 4 << 30, n_train=4096)
    err = run.stderr.strip().splitlines()
    assert run.returncode == 1, run.stderr[-2000:]
    assert len(err) == 1 and "out of memory" in err[0] and "--batch-size" in err[0] and "Traceback" not in run.stderr


def test_a_full_disk_on_save_leaves_no_partial_folder(tmp_path, capsys, fake_data):
    """backbone.pt (~600 kB) cannot be written under a 150 kB file-size limit: one line, exit 1, and neither
    the checkpoint folder nor its temporary sibling is left."""
    args = TINY_ARGS + ["--filters", "4,4,4,64,256", "--pool", "gap", "--epochs", "1", "--save",
                        str(tmp_path / "out" / "ck")]  # later flags win
    with file_size_limit(150_000):
        code = cnn_torch.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "File too large" in err[0], err
    assert list((tmp_path / "out").iterdir()) == []


def test_ctrl_c_prints_one_line_and_exits_130(capsys, monkeypatch, fake_data):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cnn_torch, "train", interrupted)
    try:
        code = cnn_torch.main(TINY_ARGS)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")
    assert code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0]
