"""The study driver (run_experiments.py): one quick study shared by the module, plus small studies that
are interrupted, resumed, forced to diverge, rebuilt without training and split into shards."""
import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest

import cnn_torch
import mlp_scratch
import run_experiments as rx
from preprocessing import to_images

CONTRACT_COLUMNS = ["study", "variant", "seed", "epochs_run", "best_epoch", "train_loss", "train_acc",
                    "val_loss", "val_acc", "test_loss", "test_acc", "seconds", "sec_per_epoch", "device",
                    "n_params", "diverged", "key"]
MODEL_KEYS = ["config", "val_acc", "test_acc", "test_macro_f1", "per_class", "confusion", "train_seconds",
              "epochs_run", "n_params"]

# An even smaller plan for the studies that are run more than once here: MLP only, one level per stage.
TINY_PLAN = dataclasses.replace(rx.QUICK_PLAN, max_levels=1,
                                mlp_grid=rx.Budget(subset=600, n_eval=300, epochs=1),
                                mlp_final=rx.Budget(subset=600, n_eval=300, epochs=1))


@pytest.fixture(scope="module")
def quick(quick_study):
    """The --quick study, shared with the report tests (tests/conftest.py): (results dir, Study)."""
    return quick_study


def _tiny(out, splits, **kw):
    opts = rx.Options(results_dir=out, quick=True, seeds=(0, 1), only="mlp", report=False, plots=False)
    return rx.run_study(opts, splits=splits, plan=TINY_PLAN, **kw)


def test_quick_study_writes_every_output(quick):
    out, study = quick
    assert not study.blocked and study.executed
    for model, cls in (("mlp", mlp_scratch.MLPConfig), ("cnn", cnn_torch.CNNConfig)):
        df = pd.read_csv(out / f"{model}_runs.csv")
        fields = [f.name for f in dataclasses.fields(cls) if f.name not in ("seed", "device")]
        assert set(CONTRACT_COLUMNS + fields) <= set(df.columns)
        studies = {s.study for s in (rx.MLP_STAGES if model == "mlp" else rx.CNN_STAGES)} | {f"{model}_final"}
        assert set(df["study"]) == studies
        grid = df[df["study"] != f"{model}_final"]
        assert grid.groupby(["study", "variant"])["seed"].nunique().min() == len(rx.QUICK_SEEDS)
        assert df["val_acc"].between(0, 1).all() and not df["diverged"].any()
    curves = pd.read_csv(out / "curves.csv")
    assert list(curves.columns) == rx.CURVE_COLUMNS and len(curves) > 0
    stats = pd.read_csv(out / "init_stats.csv")
    assert list(stats.columns) == rx.INIT_STATS_COLUMNS
    mlp_schemes = {"random", "xavier", "he", "relu", "leaky_relu", "tanh", "gelu", "sigmoid"}
    assert set(stats[stats.model == "mlp"].scheme) == mlp_schemes
    assert set(stats[stats.model == "cnn"].scheme) == {"random", "xavier", "he"}
    assert (stats[stats.model == "cnn"].groupby("scheme").size() == 5).all()  # five conv layers

    summary = json.loads((out / "summary.json").read_text())
    for model in ("mlp", "cnn"):
        assert set(MODEL_KEYS) <= set(summary[model])
        assert len(summary[model]["per_class"]) == 10 and np.array(summary[model]["confusion"]).shape == (10, 10)
        assert set(summary[model]["per_class"][0]) == {"class", "precision", "recall", "f1"}
    assert {"quick", "seconds", "seeds", "device", "finished_at", "versions", "grid_budget"} <= set(summary["study"])
    assert summary["study"]["quick"] is True and summary["study"]["grid_budget"]["mlp"]

    for name in rx.FIGURES:
        path = out / "figures" / name
        assert path.exists() and path.stat().st_size > 5000, name
    assert not list(out.rglob("*.tmp*"))  # atomic writes leave no temporary files


def test_saved_models_load_and_reproduce_the_reported_test_accuracy(quick, real_splits):
    out, _ = quick
    summary = json.loads((out / "summary.json").read_text())
    records = {r["key"]: r for r in rx.Registry(out).records.values()}
    for model in ("mlp", "cnn"):
        rec = records[summary[model]["key"]]
        data = rx._data_for(real_splits, rx.Budget(**rec["budget"]), rec["seed"])
        if model == "mlp":
            clf = mlp_scratch.MLP.load(out / "models" / "mlp_best.npz")
            pred = clf.predict(data.X_test)
        else:
            clf = cnn_torch.load_classifier(out / "models" / "cnn_best")
            pred = clf.predict(to_images(data.X_test))
        assert pred.shape == data.y_test.shape
        assert (pred == data.y_test).mean() == pytest.approx(summary[model]["test_acc"], abs=1e-9)


def test_each_stage_keeps_the_level_with_the_best_mean_validation_accuracy(quick):
    out, _ = quick
    winners = json.loads((out / "summary.json").read_text())["study"]["winners"]
    for model in ("mlp", "cnn"):
        df = pd.read_csv(out / f"{model}_runs.csv", keep_default_na=False)
        for study, group in df[~df["study"].str.endswith("_final")].groupby("study"):
            means = group.groupby("variant")["val_acc"].mean()
            assert means[winners[study]] == pytest.approx(means.max()), study


def test_an_interrupted_study_resumes_with_only_the_missing_runs(tmp_path, real_splits, monkeypatch):
    calls = []
    real = rx.RUNNERS["mlp"]

    def interrupt_after_four(spec, *a):
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the fifth run
        calls.append(spec.key)
        return real(spec, *a)

    monkeypatch.setitem(rx.RUNNERS, "mlp", interrupt_after_four)
    with pytest.raises(KeyboardInterrupt):
        _tiny(tmp_path, real_splits)
    assert {p.stem for p in (tmp_path / "runs").glob("*.json")} == set(calls)

    monkeypatch.setitem(rx.RUNNERS, "mlp", real)
    study = _tiny(tmp_path, real_splits)
    assert not set(study.executed) & set(calls)             # nothing finished is trained again
    assert set(calls) <= set(study.skipped)
    assert study.executed and not study.blocked
    again = _tiny(tmp_path, real_splits)                     # a third start has nothing left to do
    assert again.executed == [] and set(again.skipped) == set(study.executed) | set(calls)


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_a_diverging_run_is_recorded_and_the_study_goes_on(tmp_path, real_splits, monkeypatch):
    base = rx._apply(rx.default_config("mlp"), {"optimizer": "sgd", "lr": 1e6, "momentum": 0.9,
                                                "schedule": "constant", "warmup_epochs": 0.0})
    blowup = rx.make_spec("mlp", "forced_divergence", "lr 1e6", 0, base, TINY_PLAN.mlp_grid)
    raising = rx.make_spec("mlp", "forced_divergence", "raises", 0, {**base, "lr": 0.5}, TINY_PLAN.mlp_grid)
    real = rx.RUNNERS["mlp"]

    def runner(spec, *a):
        if spec.key == raising.key:
            raise FloatingPointError("overflow encountered in matmul")
        return real(spec, *a)

    monkeypatch.setitem(rx.RUNNERS, "mlp", runner)
    study = _tiny(tmp_path, real_splits, extra_runs=[blowup, raising])
    recs = rx.Registry(tmp_path).records
    assert recs[blowup.key]["diverged"] is True
    assert recs[raising.key]["diverged"] is True and "FloatingPointError" in recs[raising.key]["error"]
    assert len(study.executed) > 2 and not study.blocked    # the grid and the final still ran
    df = pd.read_csv(tmp_path / "mlp_runs.csv")
    assert df.loc[df.key.isin([blowup.key, raising.key]), "diverged"].all()
    assert not df.loc[df.study == "mlp_final", "diverged"].any()


def test_plots_only_rebuilds_tables_and_figures_without_training(quick, tmp_path, monkeypatch):
    src, _ = quick
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    shutil.rmtree(out / "figures")
    for name in ("mlp_runs.csv", "cnn_runs.csv", "curves.csv"):
        (out / name).unlink()

    def no_training(*a, **k):
        raise AssertionError("--plots-only must not train")

    monkeypatch.setitem(rx.RUNNERS, "mlp", no_training)
    monkeypatch.setitem(rx.RUNNERS, "cnn", no_training)
    assert rx.main(["--plots-only", "--results-dir", str(out), "--no-report"]) == 0
    for name in ("mlp_runs.csv", "cnn_runs.csv", "curves.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(src / name))
    assert all((out / "figures" / n).exists() for n in rx.FIGURES)
    assert json.loads((out / "summary.json").read_text())["study"]["quick"] is True


def test_shards_partition_every_stage(real_splits):
    def specs_of(shard):
        study = rx.Study(rx.Options(shard=shard, seeds=(0, 1, 2)), real_splits, rx.FULL_PLAN)
        out = []
        for model in ("mlp", "cnn"):
            cfg = study.grid_base(model)
            for stage in study.stages(model):
                specs, _ = study.stage_specs(stage, cfg)
                out.append(([s.key for s in specs], [s.key for s in study.mine(specs)]))
        return out

    parts = [specs_of((i, 3)) for i in range(3)]
    for stage_parts in zip(*parts):
        full = stage_parts[0][0]
        mine = [set(p[1]) for p in stage_parts]
        assert sum(len(m) for m in mine) == len(full) and set().union(*mine) == set(full)
    assert rx.parse_args(["--shard", "1/2"]).shard == (1, 2)
    with pytest.raises(SystemExit):
        rx.parse_args(["--shard", "2/2"])


def test_run_keys_cover_config_seed_and_budget_but_not_device():
    cfg = rx.default_config("cnn")
    b = rx.Budget(1000, 500, 2)
    key = rx.run_key("cnn", cfg, 0, b)
    assert rx.run_key("cnn", {**cfg, "device": "cuda"}, 0, b) == key
    assert rx.run_key("cnn", {**cfg, "kernel_size": cfg["kernel_size"] + 2}, 0, b) != key
    assert rx.run_key("cnn", cfg, 1, b) != key
    assert rx.run_key("cnn", cfg, 0, rx.Budget(1000, 500, 3)) != key


def test_options_added_later_keep_the_keys_of_runs_that_never_used_them():
    cfg = rx.default_config("cnn")
    b = rx.Budget(1000, 500, 2)
    neutral = rx.KEY_NEUTRAL["cnn"]
    without = {k: v for k, v in cfg.items() if k not in neutral}
    assert rx.run_key("cnn", {**cfg, **neutral}, 0, b) == rx.run_key("cnn", without, 0, b)
    for k, v in neutral.items():
        changed = 0.5 if isinstance(v, float) else not v
        assert rx.run_key("cnn", {**cfg, **neutral, k: changed}, 0, b) != rx.run_key("cnn", without, 0, b), k
    # The grid pins those options at their neutral values, whatever the module's defaults are.
    assert all(rx.FULL_PLAN.cnn_grid_overrides[k] == v for k, v in neutral.items())


def test_the_committed_results_are_what_the_code_would_run():
    """Resuming the full study over the committed results/ trains nothing: every run key the current code
    asks for, grid and finals, is already there (so the committed numbers come from this code)."""
    results = rx.REPO_DIR / "results"
    if not (results / "manifest.json").exists():
        pytest.skip("no committed full-study results")
    study = rx.Study(rx.Options(results_dir=results), None, rx.FULL_PLAN, log=lambda *a: None)
    missing = []
    study.run_specs = lambda specs: missing.extend(s for s in specs if s.key not in study.registry)
    chosen = {m: study.run_track(m) for m in ("mlp", "cnn")}
    for m in ("mlp", "cnn"):
        missing.extend(s for s in study.final_specs(m, chosen[m]) if s.key not in study.registry)
    assert not missing, [(s.study, s.variant, s.seed) for s in missing]


def test_the_full_plan_fits_the_time_budget(real_splits):
    """The plan's own estimate (idle 2-core CPU) stays inside the issue's budget of an hour."""
    study = rx.Study(rx.Options(), real_splits, rx.FULL_PLAN, log=lambda *a: None)
    assert sum(r[2] for r in study.expected_plan()) < 60 * 60


def test_study_seconds_count_each_run_once(quick):
    """A run shared by two stages is listed under both, but its time is spent once."""
    out, _ = quick
    summary = json.loads((out / "summary.json").read_text())
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert summary["study"]["seconds"] == pytest.approx(sum(r["seconds"] for r in runs))
