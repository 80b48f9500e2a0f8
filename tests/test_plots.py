"""plots.py: every figure is drawn at its printed size (no text under 7 pt), one that cannot be drawn fails
alone in one line, and the reliability diagram's bins."""
import json
from pathlib import Path

import numpy as np
import pytest

import mlp_scratch
import plots

REPO = Path(__file__).resolve().parents[1]


def _final(model, n, rng, **extra):
    y = np.arange(n) % 10
    pred = np.where(rng.random(n) < 0.8, y, (y + 1) % 10)
    return {"key": model, "model": model, "final": True, "test_true": y.tolist(), "test_pred": pred.tolist(),
            "test_prob_max": rng.uniform(0.3, 1, n).tolist(), **extra}


def test_the_calibration_bins_cover_every_image_and_the_figure_reads_at_print_size(tmp_path):
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.1, 1, 500)
    bins = plots.calibration_bins(conf, rng.random(500) < conf)
    assert sum(b["n"] for b in bins) == 500 and all(0 <= b["acc"] <= 1 for b in bins)
    assert plots.calibration_bins(np.array([1.0, 0.999]), np.array([True, False]))[-1]["n"] == 2  # 1.0: last bin
    records = [_final("mlp", 300, rng), _final("cnn", 300, rng)]
    assert [p.name for p in plots.make_figures(tmp_path, records, {}, only=("calibration.png",))] == ["calibration.png"]


def test_a_figure_that_cannot_be_drawn_fails_alone_and_small_text_is_refused(tmp_path, capsys):
    records = [_final("mlp", 100, np.random.default_rng(1)), _final("cnn", 100, np.random.default_rng(2))]
    written = plots.make_figures(tmp_path, records, {}, None, only=("calibration.png", "cnn_filters.png"))
    assert [p.name for p in written] == ["calibration.png"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cnn_filters.png" in err[0]  # no saved model: one line, the others drawn
    assert not list((tmp_path / "figures").glob("*.tmp"))
    fig, ax = plots._plt().subplots(figsize=(3, 2))
    ax.set_title("tiny", fontsize=5)
    with pytest.raises(ValueError, match="under 7 pt"):
        plots.save(fig, tmp_path / "figures" / "tiny.png")


def test_plots_redraws_a_figure_from_the_saved_model_when_the_record_lacks_predictions(tmp_path, synthetic_splits):
    """The confident-mistakes figure recomputes predictions from the final model when the record's own do not
    cover the test set (a quick study's subset): the saved file, loaded back, gives them."""
    model = mlp_scratch.MLP(784, [16], 10, seed=0)
    model.save(tmp_path / "models" / "m.npz")
    n = len(synthetic_splits.y_test)
    records = [{"key": "k", "model": "mlp", "final": True, "model_file": "models/m.npz"},
               {"key": "c", "model": "cnn", "final": True, "test_pred": [0] * n, "test_prob_max": [0.5] * n}]
    written = plots.make_figures(tmp_path, records, {}, synthetic_splits, only=("confident_mistakes.png",))
    assert [p.name for p in written] == ["confident_mistakes.png"]
    stats = json.loads((tmp_path / "figures" / "mistakes.json").read_text())
    pred = model.forward(synthetic_splits.X_test).argmax(axis=1)
    assert stats["mlp"]["n_wrong"] == int((pred != synthetic_splits.y_test).sum())
