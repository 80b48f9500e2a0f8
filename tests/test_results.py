"""study_results: atomic writes, the results lock, the run registry, tables, statistics and summary.json,
all on tiny synthetic records in tmp_path (no training, no data)."""
import errno
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import cli
import study_results as sr


def strict_loads(text):
    """json.loads that fails on NaN / Infinity, as every JSON reader but Python's does."""
    def refuse(name):
        raise AssertionError(f"{name} in JSON")
    return json.loads(text, parse_constant=refuse)


def make_record(key, *, model="mlp", study="mlp_width", variant="256", seed=0, role="grid", val_acc=0.85,
                train_acc=0.9, plan="quick", **extra):
    rec = {"key": key, "model": model, "study": study, "variant": variant, "seed": seed, "role": role,
           "final": role == "final", "plan": plan, "config": {"hidden": [256], "lr": 0.1},
           "budget": {"subset": 1000, "epochs": 2}, "n_train": 1000, "n_val": 200,
           "epochs_run": 2, "best_epoch": 2, "train_loss": 0.3, "train_acc": train_acc, "val_loss": 0.4,
           "val_acc": val_acc, "seconds": 1.5, "sec_per_epoch": 0.7, "threads": 1, "device": "cpu",
           "n_params": 1000, "macs": 2000, "diverged": False, "error": None,
           "history": [{"epoch": 1, "lr": 0.1, "train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.5,
                        "val_acc": 0.8, "seconds": 0.7},
                       {"epoch": 2, "lr": 0.05, "train_loss": 0.3, "train_acc": train_acc, "val_loss": 0.4,
                        "val_acc": val_acc, "seconds": 0.7}],
           "layer_stats": None, "finished_at": "2026-11-26T00:00:00+00:00"}
    rec.update(extra)
    return rec


def final_record(key, y, pred, *, model="mlp", seed=0, variant="chain", val_acc=0.9, plan="quick"):
    pred = [int(p) for p in pred]
    test_acc = float(np.mean(np.asarray(pred) == np.asarray(y)))
    rf = {"test_acc": test_acc, "test_loss": 0.3, "n_test": len(y), "test_pred": pred, "test_true": [int(v) for v in y],
          "test_prob_max": [0.9] * len(y), "test_macro_f1": test_acc,
          "per_class": [{"class": "c", "precision": 1.0, "recall": 1.0, "f1": 1.0}],
          "confusion": [[0] * 10 for _ in range(10)],
          "model_file": f"models/runs/{key}.npz" if model == "mlp" else f"models/runs/{key}"}
    return make_record(key, model=model, study=f"{model}_final", variant=variant, seed=seed, role="final",
                       val_acc=val_acc, plan=plan, **rf)


def write_raw(results, name, text):
    (results / "runs").mkdir(parents=True, exist_ok=True)
    (results / "runs" / name).write_text(text)


# ------------------------------------------------------------------------------------------ atomic_write

def test_atomic_write_text_and_bytes(tmp_path):
    p = tmp_path / "a" / "b.txt"
    cli.atomic_write(p, "hello")
    assert p.read_text() == "hello"
    cli.atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(p.parent)) == ["b.txt"]  # no temporary left


@pytest.mark.parametrize("fail", ["write", "replace"])
def test_atomic_write_disk_full_leaves_original_and_no_temporary(tmp_path, monkeypatch, fail):
    p = tmp_path / "summary.json"
    p.write_text("original")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, fail, full)
    with pytest.raises(OSError) as e:
        cli.atomic_write(p, "new contents")
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    assert p.read_text() == "original"
    assert os.listdir(tmp_path) == ["summary.json"]


def test_registry_add_disk_full_writes_nothing(tmp_path, monkeypatch):
    reg = sr.Registry(tmp_path, log=lambda m: None)
    monkeypatch.setattr(os, "write", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        reg.add(final_record("k1", [0, 1], [0, 1]), {"models/runs/k1.npz": b"weights"})
    monkeypatch.undo()
    assert "k1" not in reg
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # neither model, record nor temporary


# ------------------------------------------------------------------------------------------ lock

def test_lock_held_twice_names_the_holder(tmp_path):
    with sr.results_lock(tmp_path):
        with pytest.raises(sr.StudyError) as e:
            with sr.results_lock(tmp_path):
                pass
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and str(tmp_path) in msg and "\n" not in msg
    with sr.results_lock(tmp_path):  # released: free again
        pass


# ------------------------------------------------------------------------------------------ registry

@pytest.mark.parametrize("text", ["{}", "[]", "not json {", '{"key": "x"}', "NaN"])
def test_damaged_record_is_set_aside_and_named(tmp_path, text):
    write_raw(tmp_path, "bad1.json", text)
    logs = []
    reg = sr.Registry(tmp_path, log=logs.append)
    assert reg.records == {} and "x" not in reg
    assert len(logs) == 1 and "bad1.json" in logs[0] and "\n" not in logs[0]
    assert (tmp_path / "runs" / "bad1.json.bad").exists()
    assert not (tmp_path / "runs" / "bad1.json").exists()


def test_string_accuracy_is_set_aside_and_unique_bad_name(tmp_path):
    write_raw(tmp_path, "s.json", json.dumps(make_record("s", val_acc="0.9")))
    write_raw(tmp_path, "s.json.bad", "older damage")
    logs = []
    reg = sr.Registry(tmp_path, log=logs.append)
    assert "s" not in reg
    assert len(logs) == 1 and "s.json" in logs[0] and "val_acc" in logs[0]
    assert (tmp_path / "runs" / "s.json.bad").read_text() == "older damage"
    assert (tmp_path / "runs" / "s.json.1.bad").exists()


def test_valid_records_load_and_nan_becomes_null(tmp_path):
    reg = sr.Registry(tmp_path, log=print)
    reg.add(make_record("g1", train_loss=float("nan"), n_params=np.int64(5)))
    text = (tmp_path / "runs" / "g1.json").read_text()
    rec = strict_loads(text)
    assert rec["train_loss"] is None and rec["n_params"] == 5
    again = sr.Registry(tmp_path, log=print)
    assert "g1" in again and again.records["g1"]["val_acc"] == 0.85


def test_diverged_runs_are_valid_records(tmp_path):
    reg = sr.Registry(tmp_path)
    reg.add(make_record("d1", val_acc=None, diverged=True, error="non-finite loss at epoch 1"))
    reg.add(make_record("d2", role="final", study="mlp_final", val_acc=None, diverged=True))
    again = sr.Registry(tmp_path)
    assert "d1" in again and "d2" in again and again.records["d2"]["final"] is True


def test_add_refuses_a_bad_record(tmp_path):
    reg = sr.Registry(tmp_path)
    with pytest.raises(ValueError):
        reg.add({"key": "x"})
    assert not (tmp_path / "runs" / "x.json").exists()


def test_final_run_model_written_first_and_missing_model_means_not_done(tmp_path):
    reg = sr.Registry(tmp_path, log=print)
    rec = final_record("f1", [0, 1, 2], [0, 1, 1])
    reg.add(rec, {"models/runs/f1.npz": b"weights"})
    assert (tmp_path / "models" / "runs" / "f1.npz").read_bytes() == b"weights"
    assert "f1" in sr.Registry(tmp_path)
    (tmp_path / "models" / "runs" / "f1.npz").unlink()
    logs = []
    reg2 = sr.Registry(tmp_path, log=logs.append)
    assert "f1" not in reg2 and "f1" in reg2.missing_models
    assert len(logs) == 1 and "f1" in logs[0]


def test_cnn_model_directory(tmp_path):
    reg = sr.Registry(tmp_path)
    rec = final_record("c1", [0, 1], [0, 1], model="cnn")
    reg.add(rec, {"models/runs/c1/backbone.pt": b"b", "models/runs/c1/config.json": b"{}"})
    assert "c1" in sr.Registry(tmp_path)
    (tmp_path / "models" / "runs" / "c1" / "backbone.pt").unlink()
    assert "c1" not in sr.Registry(tmp_path, log=lambda m: None)


def test_leftover_temporaries_removed_at_load(tmp_path):
    write_raw(tmp_path, ".abc.json.1234.tmp", "half")
    write_raw(tmp_path, ".abc.json.x9y8.tmp", "half")
    old = time.time() - 3600
    for p in (tmp_path / "runs").iterdir():
        os.utime(p, (old, old))
    sr.Registry(tmp_path)
    assert list((tmp_path / "runs").iterdir()) == []


# ------------------------------------------------------------------------------------------ statistics

def test_wilson_known_values():
    assert sr.wilson_interval(5, 10) == pytest.approx((0.236590, 0.763410), abs=1e-6)
    assert sr.wilson_interval(90, 100) == pytest.approx((0.825633, 0.944771), abs=1e-6)
    lo, hi = sr.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1.96 ** 2 / (10 + 1.96 ** 2))
    assert sr.wilson_interval(0, 0) == (0.0, 1.0)


def _pairs(n01, n10, n_both=5):
    """Predictions with n01 images only B gets right, n10 only A, n_both both right."""
    y = np.zeros(n01 + n10 + n_both, dtype=int)
    a = np.r_[np.ones(n01, int), np.zeros(n10 + n_both, int)]
    b = np.r_[np.zeros(n01, int), np.ones(n10, int), np.zeros(n_both, int)]
    return a, b, y


def test_mcnemar_exact_by_hand():
    out = sr.mcnemar(*_pairs(2, 7))
    assert (out["n01"], out["n10"]) == (2, 7)
    # two-sided exact binomial: 2 * P(X <= 2), X ~ Bin(9, 1/2) = 2 * (1 + 9 + 36) / 512
    assert out["p_value"] == pytest.approx(2 * 46 / 512, rel=1e-12)
    assert sr.mcnemar(*_pairs(0, 0))["p_value"] == 1.0
    assert sr.mcnemar(*_pairs(3, 3))["p_value"] == 1.0  # capped at 1


def test_mcnemar_chi_square_against_integrated_normal():
    out = sr.mcnemar(*_pairs(10, 30))
    z = (abs(10 - 30) - 1) / math.sqrt(40)  # continuity-corrected statistic, sqrt of chi2(1)
    t = np.linspace(z, 12, 200001)
    tail = np.trapezoid(np.exp(-t ** 2 / 2) / math.sqrt(2 * math.pi), t) if hasattr(np, "trapezoid") \
        else np.trapz(np.exp(-t ** 2 / 2) / math.sqrt(2 * math.pi), t)
    assert out["p_value"] == pytest.approx(2 * tail, rel=1e-6)
    with pytest.raises(ValueError):
        sr.mcnemar([0, 1], [0], [0, 1])


def test_study_table_one_seed_has_no_spread_and_diverged_is_counted():
    recs = [make_record("a0", variant="128", seed=0, val_acc=0.80),
            make_record("b0", variant="256", seed=0, val_acc=0.84),
            make_record("b1", variant="256", seed=1, val_acc=0.86),
            make_record("b2", variant="256", seed=2, val_acc=0.10, diverged=True),
            make_record("o0", study="other", variant="256")]
    rows = sr.study_table(recs, "mlp_width", levels=["256", "128", "512"])
    assert [r["variant"] for r in rows] == ["256", "128"]
    r256, r128 = rows
    assert r256["n"] == 3 and r256["diverged"] == 1
    assert r256["val_acc"] == pytest.approx(0.85)
    assert r256["val_acc_std"] == pytest.approx(np.std([0.84, 0.86], ddof=1))
    assert r128["val_acc_std"] is None and r128["train_acc_std"] is None
    assert r128["n_params"] == 1000 and r128["macs"] == 2000 and r128["seconds"] == 1.5


def test_classification_report():
    rep = sr.classification_report([0, 0, 1, 1], [0, 1, 1, 1], class_names=("a", "b"))
    assert rep["confusion"] == [[1, 1], [0, 2]]
    assert rep["per_class"][1]["precision"] == pytest.approx(2 / 3)
    assert rep["test_macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    with warnings.catch_warnings():  # a class never true nor predicted scores 0, without a 0/0 warning
        warnings.simplefilter("error")
        rep = sr.classification_report([0, 0], [0, 0], class_names=("a", "b"))
    assert rep["per_class"][1] == {"class": "b", "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert rep["test_macro_f1"] == 0.5


# ------------------------------------------------------------------------------------------ outputs

Y = np.arange(40) % 10


def _wrong(n, shift=1):
    pred = Y.copy()
    pred[:n] = (pred[:n] + shift) % 10
    return pred


def build_study(results, *, mlp_seeds=(0, 1, 2), with_default=True, plan="quick"):
    """A finished tiny study: two grid stages, an ablation, MLP and CNN finals, and its manifest."""
    reg = sr.Registry(results, log=lambda m: None)
    runs = []

    def add(rec, files=None):
        reg.add(rec, files)
        runs.append({k: rec[k] for k in ("model", "study", "variant", "seed", "key", "role")})
    for seed in (0, 1):
        for v, acc in (("128", 0.80), ("256", 0.84)):
            add(make_record(f"w{v}s{seed}", variant=v, seed=seed, val_acc=acc + 0.01 * seed, plan=plan))
        for v, acc in (("full recipe", 0.9), ("no batchnorm", 0.88)):
            add(make_record(f"ab{v[:2]}{seed}", model="cnn", study="cnn_ablation", variant=v, seed=seed,
                            role="ablation", val_acc=acc, plan=plan))
    for seed in mlp_seeds:
        add(final_record(f"mchain{seed}", Y, _wrong(4 + seed), seed=seed, val_acc=0.9, plan=plan),
            {f"models/runs/mchain{seed}.npz": b"mlp%d" % seed})
    if with_default:
        add(final_record("mdefault0", Y, _wrong(6, shift=2), variant="start", val_acc=0.88, plan=plan),
            {"models/runs/mdefault0.npz": b"mlp start"})
    add(final_record("cchain0", Y, _wrong(1), model="cnn", plan=plan),
        {"models/runs/cchain0/backbone.pt": b"cnn", "models/runs/cchain0/config.json": b"{}"})
    manifest = {
        "plan": plan,
        "seeds": {"mlp": [0, 1], "cnn": [0]}, "runs": runs,
        "stages": {"mlp_width": {"model": "mlp", "factor": "hidden", "ordered": True, "default": "256",
                                 "winner": "256", "levels": ["128", "256"], "contrast": [],
                                 "extended": False, "edge": True},
                   "cnn_ablation": {"model": "cnn", "factor": "recipe", "ordered": False,
                                    "default": "full recipe", "winner": "full recipe",
                                    "levels": ["full recipe", "no batchnorm"], "contrast": []}},
        "finals": {"mlp": {"candidates": {"chain": [f"mchain{s}" for s in mlp_seeds],
                                          **({"start": ["mdefault0"]} if with_default else {})},
                           "kept": "chain", "seeds": [f"mchain{s}" for s in mlp_seeds]},
                   "cnn": {"candidates": {"chain": ["cchain0"]}, "kept": "chain", "seeds": ["cchain0"]}},
    }
    sr.write_json(results / "manifest.json", manifest)
    return manifest


def read_csv(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rebuild_outputs_tables_summary_and_models(tmp_path):
    build_study(tmp_path)
    logs = []
    rows, manifest, summary = sr.rebuild_outputs(tmp_path, log=logs.append, wall_seconds=12.5,
                                                 workers=2)
    assert len(rows) == 13 and manifest["stages"]["mlp_width"]["winner"] == "256"  # what the figures draw from
    assert logs == [] or all("warning" not in m for m in logs), logs
    on_disk = strict_loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    mlp = on_disk["mlp"]
    assert mlp["key"] == "mchain0" and mlp["kept"] == "chain"
    assert mlp["test_acc"] == pytest.approx(36 / 40)
    assert [s["seed"] for s in mlp["seeds"]] == [0, 1, 2]
    accs = [36 / 40, 35 / 40, 34 / 40]
    assert mlp["test_acc_mean"] == pytest.approx(np.mean(accs))
    assert mlp["test_acc_std"] == pytest.approx(np.std(accs, ddof=1))
    assert mlp["test_acc_wilson95"] == pytest.approx(list(sr.wilson_interval(36, 40)))
    assert {c["name"] for c in mlp["candidates"]} == {"chain", "start"}
    start = next(c for c in mlp["candidates"] if c["name"] == "start")
    assert start["val_diff_to_kept"] == {"n": 1, "diff": pytest.approx(0.88 - 0.9), "ci": None}  # seed 0 only
    assert on_disk["cnn"]["test_acc_std"] is None
    tests = {(t["a"], t["b"]): t for t in on_disk["mcnemar"]}
    assert set(tests) == {("MLP", "CNN"), ("MLP chain", "MLP start")}
    t = tests[("MLP", "CNN")]
    assert (t["n01"], t["n10"]) == (3, 0) and t["a_key"] == "mchain0" and t["b_key"] == "cchain0"
    assert t["p_value"] == pytest.approx(2 * 1 / 8)
    assert on_disk["stages"]["mlp_width"]["edge"] is True
    assert [r["variant"] for r in on_disk["stages"]["mlp_width"]["table"]] == ["128", "256"]
    assert [r["variant"] for r in on_disk["ablation"]] == ["full recipe", "no batchnorm"]
    st = on_disk["study"]
    assert st["plan"] == "quick" and st["wall_seconds"] == 12.5 and st["workers"] == 2
    assert st["seeds"] == {"mlp": [0, 1], "cnn": [0]} and st["n_runs"] == 13
    # CSVs: runs without test columns; finals with them
    for model in ("mlp", "cnn"):
        rows = read_csv(tmp_path / f"{model}_runs.csv")
        assert rows and not any(c.startswith("test") for c in rows[0])
    assert len(read_csv(tmp_path / "mlp_runs.csv")) == 4 + 4
    finals = read_csv(tmp_path / "finals.csv")
    assert len(finals) == 5 and {"test_acc", "test_acc_wilson_lo", "test_acc_wilson_hi"} <= set(finals[0])
    kept = {r["key"]: r["kept"] for r in finals}
    assert kept["mchain1"] == "True" and kept["mdefault0"] == "False"
    assert len(read_csv(tmp_path / "curves.csv")) == 2 * 13
    # best models: copies of the kept seed-0 runs; a second rebuild replaces the CNN folder
    assert (tmp_path / "models" / "mlp_best.npz").read_bytes() == b"mlp0"
    assert (tmp_path / "models" / "cnn_best" / "backbone.pt").read_bytes() == b"cnn"
    sr.rebuild_outputs(tmp_path, log=logs.append)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["cnn_best", "mlp_best.npz", "runs"]
    assert strict_loads((tmp_path / "summary.json").read_text())["study"]["wall_seconds"] == 12.5  # kept


def test_one_seed_summary_is_strict_json_with_null_std(tmp_path):
    manifest = build_study(tmp_path, mlp_seeds=(0,), with_default=False)
    for p in (tmp_path / "runs").glob("w*s1.json"):
        p.unlink()
    sr.write_json(tmp_path / "manifest.json", {**manifest, "runs": [r for r in manifest["runs"] if r["seed"] == 0]})
    sr.rebuild_outputs(tmp_path, log=lambda m: None)
    summary = strict_loads((tmp_path / "summary.json").read_text())
    assert summary["mlp"]["test_acc_std"] is None and summary["mlp"]["test_acc_mean"] == summary["mlp"]["test_acc"]
    table = summary["stages"]["mlp_width"]["table"]
    assert all(r["n"] == 1 and r["val_acc_std"] is None for r in table)
    assert [(t["a"], t["b"]) for t in summary["mcnemar"]] == [("MLP", "CNN")]


def test_garbage_manifest_summary_and_records_give_warnings_not_tracebacks(tmp_path):
    build_study(tmp_path)
    (tmp_path / "manifest.json").write_text("{ garbage")
    (tmp_path / "summary.json").write_text("[1, 2")
    write_raw(tmp_path, "zz.json", "[]")
    (tmp_path / "models" / "runs" / "mchain2.npz").unlink()
    logs = []
    _, _, summary = sr.rebuild_outputs(tmp_path, log=logs.append)
    assert any("manifest.json" in m for m in logs) and any("summary.json" in m for m in logs)
    skipped = [m for m in logs if m.startswith("skipped:")]
    assert len(skipped) == 1 and "zz.json" in skipped[0] and "mchain2" in skipped[0]
    assert all("\n" not in m for m in logs)
    # without a manifest nothing says which runs make up a comparison or a final: no stages, no finals
    assert summary["stages"] == {} and "mlp" not in summary and "cnn" not in summary
    strict_loads((tmp_path / "summary.json").read_text())


def test_damaged_parts_of_the_manifest_are_dropped(tmp_path):
    build_study(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["runs"].append({"key": 5})
    m["stages"]["bad"] = [1]
    m["finals"]["cnn"] = "x"
    sr.write_json(tmp_path / "manifest.json", m)
    logs = []
    out = sr.load_manifest(tmp_path, log=logs.append)
    assert len(logs) == 1 and f"damaged runs: {len(m['runs']) - 1}" in logs[0] and "bad" in logs[0] and "cnn" in logs[0]
    assert "bad" not in out["stages"] and "cnn" not in out["finals"] and len(out["runs"]) == len(m["runs"]) - 1
    sr.write_json(tmp_path / "manifest.json", [])
    assert sr.load_manifest(tmp_path, log=lambda m: None)["runs"] == []


def test_a_rebuild_with_runs_of_the_manifest_missing_is_refused_and_writes_nothing(tmp_path):
    build_study(tmp_path)
    sr.rebuild_outputs(tmp_path, log=lambda m: None)
    (tmp_path / "runs" / "w128s1.json").unlink()
    (tmp_path / "runs" / "w256s0.json").write_text("[]")  # damaged: set aside, and missing like the other
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(sr.StudyError, match=r"^2 of the 13 runs that manifest.json lists are missing or damaged"):
        sr.rebuild_outputs(tmp_path, log=lambda m: None)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_the_one_reader_reads_without_renaming_anything(tmp_path):
    build_study(tmp_path)
    write_raw(tmp_path, "zz.json", "[]")
    logs = []
    rows, manifest = sr.load_runs(tmp_path, log=logs.append)
    assert len(rows) == 13 and set(manifest["stages"]) == {"mlp_width", "cnn_ablation"}
    assert len(logs) == 1 and "zz.json" in logs[0] and (tmp_path / "runs" / "zz.json").exists()


def test_missing_labels_skip_mcnemar_with_a_warning(tmp_path):
    build_study(tmp_path)
    for p in (tmp_path / "runs").glob("*chain0.json"):
        rec = json.loads(p.read_text())
        sr.write_json(p, {k: v for k, v in rec.items() if k != "test_true"})
    logs = []
    _, _, summary = sr.rebuild_outputs(tmp_path, log=logs.append)
    assert summary["mcnemar"] == [] and any("McNemar" in m for m in logs)


def test_compare_studies_tells_identical_records_from_changed_and_missing_ones(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_study(a)
    build_study(b)
    for p in (b / "runs").glob("*.json"):  # timings differ from run to run: they are not compared
        rec = json.loads(p.read_text())
        p.write_text(json.dumps({**rec, "seconds": 99.0, "finished_at": "2030-01-01T00:00:00+00:00"}))
    rows, line = sr.compare_studies(b, a)
    assert {r["status"] for r in rows} == {"identical"} and line.startswith(f"{len(rows)} of {len(rows)} run records")
    changed = json.loads((b / "runs" / "mchain1.json").read_text())
    (b / "runs" / "mchain1.json").write_text(json.dumps({**changed, "val_acc": changed["val_acc"] + 0.01}))
    (b / "runs" / "w128s0.json").unlink()
    rows, line = sr.compare_studies(b, a)
    status = {r["key"]: r["status"] for r in rows}
    assert status["mchain1"] == "differs" and status["w128s0"] == "missing"
    assert "1 differ, the largest accuracy difference 1.00 points (beyond the tolerance" in line and "1 missing" in line


def _readme_row(readme: str, first_cell: str) -> str:
    rows = [line for line in readme.splitlines() if line.startswith(f"| {first_cell}")]
    assert len(rows) == 1, f"README.md: one table row starting with '| {first_cell}' expected, got {len(rows)}"
    return rows[0]


def test_the_readme_states_the_committed_results():
    """Every number of the README's result tables is the one results/ holds (summary.json, grid_budget.json, the
    recipe sweep's timed rows), formatted as the README writes it."""
    repo = Path(__file__).resolve().parents[1]
    readme, results = (repo / "README.md").read_text(), repo / "results"
    summary = sr.loads((results / "summary.json").read_text())
    for model, label in (("mlp", "MLP from scratch:"), ("cnn", "CNN:")):
        m, row = summary[model], _readme_row(readme, label)
        lo, hi = m["test_acc_wilson95"]
        for stated in (f"{100 * m['test_acc_mean']:.2f} ± {100 * m['test_acc_std']:.2f}% ({len(m['seeds'])} seeds)",
                       f"{100 * m['test_acc']:.2f}% ({100 * lo:.2f}-{100 * hi:.2f}%)",
                       f"{100 * m['test_macro_f1']:.2f}%", f"{100 * m['val_acc_mean']:.2f}%",
                       f"{m['train_seconds'] / 60:.1f} min"):
            assert stated in row, f"README.md's {label} row does not state {stated!r}: {row}"
    for model in ("mlp", "cnn"):  # the confirmation: the chain of winners against the start, and the grid's gains
        diff = {c["name"]: c["val_diff_to_kept"] for c in summary[model]["candidates"]}
        sign = -1 if summary[model]["kept"] == "chain" else 1  # to kept: start - chain, or chain - start
        d = diff["start" if sign < 0 else "chain"]
        lead, (lo, hi) = sign * d["diff"], sorted(sign * x for x in d["ci"])
        gain = sum(st["gain"] for k, st in summary["stages"].items() if st["model"] == model and k != "cnn_ablation")
        for stated in (f"{100 * lead:.2f}", f"{100 * lo:.2f} to {100 * hi:+.2f}", f"{100 * gain:.2f}"):
            assert stated in readme, f"README.md does not state the {model} confirmation's {stated}"
    for v in json.loads((results / "grid_budget.json").read_text())["factors"]:
        row = _readme_row(readme, f"{v['model'].upper()} {v['factor']}")
        stated = [f"{100 * m:.2f}" for m in v["means"].values()] + ["passes" if v["passes"] else "fails"]
        assert all(s in row for s in stated), f"README.md's grid-budget row does not state {stated}: {row}"
    timed = sorted(json.loads(line)["wall_seconds"] for line in (results / "cnn_default_timing.jsonl").read_text().splitlines())
    assert f"median {timed[1] / 60:.1f} min" in readme
    assert f"the study {summary['study']['wall_seconds'] / 60:.0f})" in readme  # the main command's time
