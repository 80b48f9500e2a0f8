"""The study driver (run_experiments.py): its decisions on fake records, and tiny real studies on a local Dask
cluster and on a scheduler with two worker processes started here."""
import dataclasses
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import cli
import run_experiments as rx
import study_results

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_client_left_to_collect():
    """A Dask Client that an earlier test left behind (e.g. a handshake given up on) must be finalised here,
    not by a garbage collection that happens to run inside the next Client's start: distributed's
    Client.__del__ then waits on the loop that start holds, and the suite hangs. What survives is frozen, so
    that the next collection looks only at what the next test made (a full one takes 0.2 s with torch loaded)."""
    gc.collect()
    gc.freeze()


def _study(out, splits, plan, *flags):
    args = rx.parse_args(["--results-dir", str(out), "--only", "mlp", *flags])
    return rx.run_study(args, splits=splits, plan=plan, log=lambda *a: None, plots=False)


@pytest.fixture(scope="module")
def mlp_study(tmp_path_factory, synthetic_splits, tiny_plan):
    out = tmp_path_factory.mktemp("mlp_study")
    return out, _study(out, synthetic_splits, tiny_plan)


def _vals(out: Path) -> dict:
    return {r["key"]: (r["val_acc"], r.get("test_acc")) for r in study_results.Registry(out).records.values()}


# ---------------------------------------------------------------------------------- decisions, no training

class FakeEngine:
    """Answers each run with a validation accuracy from `score(spec)` and wall seconds from `seconds(spec)`
    (default: 10 s); trains nothing. Records what was run (calls)."""

    def __init__(self, score, seconds=None, device="cpu"):
        self.score, self.seconds, self.asked = score, seconds or (lambda s: 10.0), []
        self.device, self.threads, self.calls = device, 1, []

    def start(self, specs):  # nothing to submit: run() answers at once
        return []

    def run(self, specs):
        self.asked += specs
        self.calls.append([(s.variant, s.seed) for s in specs])
        return [{"key": s.key, "seed": s.seed, "val_acc": self.score(s), "diverged": False,
                 "seconds": self.seconds(s)} for s in specs]


def _decide(score, study="mlp_lr", seconds=None):
    stage = rx.STAGE[study]
    study_ = rx.Study(FakeEngine(score, seconds), rx.FULL_PLAN, only=stage.model)
    study_.run_stage(stage, rx.start_config(stage.model, rx.FULL_PLAN))
    return study_.stages[study], study_.engine.asked


def test_a_stage_holds_the_incumbent_and_a_level_on_each_side_of_it():
    stage, asked = _decide(lambda s: 0.8)
    assert stage["incumbent"] == "0.001" and stage["levels"] == ["0.000333", "0.001", "0.003"]
    assert stage["winner"] == "0.001" and not stage["extended"] and not stage["edge"]  # an exact tie: the incumbent
    assert stage["rows"]["0.003"]["diff"] == 0.0 and stage["sd"] == 0.0 and stage["gain"] == 0.0
    assert len(asked) == 3 * len(rx.FULL_PLAN.mlp_seeds)
    assert all(s.role == "grid" and s.budget == rx.FULL_PLAN.mlp_grid for s in asked)


def test_a_winner_at_the_edge_gets_one_more_level_beyond_it():
    stage, _ = _decide(lambda s: s.config["lr"] * 10)  # the larger the rate, the better
    assert stage["levels"] == ["0.000333", "0.001", "0.003", "0.009"]
    assert stage["extended"] and stage["winner"] == "0.009" and stage["edge"]  # still at the edge: flagged
    assert stage["gain"] == pytest.approx(0.09 - 0.01) and stage["changes"] == {"lr": 0.009}
    stage, _ = _decide(lambda s: -abs(s.config["lr"] - 0.003))  # best at 0.003, found after one step
    assert stage["winner"] == "0.003" and stage["extended"] and not stage["edge"]


def _seeded(means: dict, spreads: dict):
    """Records of levels with these mean accuracies, seed 0 at mean - spread and seed 1 at mean + spread."""
    return {v: [{"seed": 0, "val_acc": m - spreads.get(v, 0), "diverged": False},
                {"seed": 1, "val_acc": m + spreads.get(v, 0), "diverged": False}] for v, m in means.items()}


def test_the_best_mean_wins_unless_a_cheaper_level_is_within_the_tie():
    levels = {"a": 0.900, "b": 0.903, "c": 0.8996}
    cost = {"a": 1, "b": 1, "c": 1}
    assert rx.decide(_seeded(levels, {}), cost, set(levels), "a")["winner"] == "b"  # no evidence rule: the best
    cheap = rx.decide(_seeded({**levels, "c": 0.9026}, {}), {**cost, "c": 0.5}, set(levels), "a")
    assert cheap["winner"] == "c"  # 0.04 points behind b, half the multiply-adds
    assert rx.decide(_seeded({**levels, "c": 0.9024}, {}), {**cost, "c": 0.5}, set(levels), "a")["winner"] == "b"


def test_each_level_is_compared_with_the_winner_paired_by_seed():
    # b - a per seed: 0.003 - 0.001 = 0.002 and 0.003 + 0.001 = 0.004; c - b: -0.004 -/+ 0.001
    d = rx.decide(_seeded({"a": 0.900, "b": 0.903, "c": 0.899}, {"a": 0.001, "c": 0.002, "b": 0.002}),
                  dict.fromkeys("abc", 1), set("abc"), "a")
    assert d["winner"] == "b" and d["dof"] == 2
    diffs = {"a": [(0.899 - 0.901), (0.901 - 0.905)], "c": [(0.897 - 0.901), (0.901 - 0.905)]}
    sd = np.sqrt(sum(((np.array(v) - np.mean(v)) ** 2).sum() for v in diffs.values()) / 2)
    assert d["sd"] == pytest.approx(sd)
    for v in "ac":
        half = 4.303 * sd / np.sqrt(2)
        assert d["rows"][v]["diff"] == pytest.approx(np.mean(diffs[v]))
        assert d["rows"][v]["ci"] == pytest.approx([np.mean(diffs[v]) - half, np.mean(diffs[v]) + half])
    assert d["mdd"] == pytest.approx((4.303 + 1.061) * sd / np.sqrt(2))
    one_seed = rx.decide({v: [{"seed": 0, "val_acc": m, "diverged": False}] for v, m in {"a": .9, "b": .8}.items()},
                         {"a": 1, "b": 1}, {"a", "b"}, "b")
    assert one_seed["winner"] == "a" and one_seed["mdd"] is None and one_seed["rows"]["b"]["ci"] is None


def test_a_level_with_a_diverged_seed_or_a_contrast_level_never_wins():
    recs = {"a": [{"seed": 0, "val_acc": 0.9, "diverged": False}], "b": [{"seed": 0, "val_acc": 0.95, "diverged": True}],
            "c": [{"seed": 0, "val_acc": 0.99, "diverged": False}]}
    assert rx.decide(recs, dict.fromkeys("abc", 1), {"a", "b"}, "a")["winner"] == "a"
    stage, _ = _decide(lambda s: 0.5 if s.config["batchnorm"] else 0.9, study="cnn_init")
    assert stage["winner"] == "xavier" and set(stage["contrast"]) == {"random, no BN", "xavier, no BN", "he, no BN"}


def _confirm(model, candidates, score=lambda s: 0.9):
    engine = FakeEngine(score)
    study_ = rx.Study(engine, rx.FULL_PLAN, only=model)
    study_.confirm(model, candidates)
    return study_.finals[model], engine


def test_a_chain_equal_to_the_start_is_one_candidate_trained_on_every_final_seed():
    start = rx.start_config("mlp", rx.FULL_PLAN)
    finals, engine = _confirm("mlp", {"chain": start, "start": start})
    assert engine.calls == [[("chain", s) for s in rx.FULL_PLAN.mlp_final_seeds]]  # at once
    assert finals["kept"] == "chain" and finals["same"] == {"chain": "chain", "start": "chain"}
    assert finals["seeds"] == finals["candidates"]["chain"] and len(finals["seeds"]) == 3
    assert all(s.role == "final" and s.budget == rx.FULL_PLAN.mlp_final for s in engine.asked)


def test_the_candidates_train_side_by_side_and_the_best_mean_validation_is_kept():
    start = rx.start_config("mlp", rx.FULL_PLAN)
    cands = {"chain": {**start, "lr": 0.003}, "start": start, "largest single change": {**start, "dropout": 0.1}}
    finals, engine = _confirm("mlp", cands, score=lambda s: {"start": 0.90, "chain": 0.89}.get(s.variant, 0.895))
    assert engine.calls == [[(n, s) for n in cands for s in rx.FULL_PLAN.mlp_final_seeds]]
    assert finals["kept"] == "start" and finals["seeds"] == finals["candidates"]["start"]


def test_the_cnn_confirmation_trains_the_chain_with_the_other_head_mode_beside_it():
    start = rx.start_config("cnn", rx.FULL_PLAN)
    finals, engine = _confirm("cnn", {"chain": start, "start": start})
    other = [s for s in engine.asked if s.role == "heads"]
    assert [s.config["head_mode"] for s in other] == ["joint"] * len(rx.FULL_PLAN.cnn_final_seeds)
    assert finals["heads"] == {"frozen": finals["candidates"]["chain"], "joint": [s.key for s in other]}


def test_a_track_confirms_its_largest_single_grid_change_on_its_own():
    engine = FakeEngine(lambda s: 0.9 + s.config["dropout"] / 10 + (0.01 if s.config["activation"] == "gelu" else 0)
                        - (0.1 if s.config["hidden"] != [1024, 1024] else 0))
    study = rx.Study(engine, rx.FULL_PLAN, only="mlp")
    study.run_track("mlp")
    finals = study.finals["mlp"]
    assert set(finals["candidates"]) == {"chain", "start", "largest single change"}
    single = next(s for s in engine.asked if s.variant == "largest single change")
    assert single.config["dropout"] > 0.3 and single.config["activation"] == "relu"  # dropout's gain was larger


def test_filter_shapes_spend_the_same_multiply_adds_as_the_default():
    cfg = rx.start_config("cnn", rx.FULL_PLAN)
    target = rx.cnn_macs(cfg)
    levels = rx._cnn_filter_levels(cfg)
    assert {lv.variant for lv in levels} == set(rx.FILTER_SHAPES)
    assert next(lv for lv in levels if lv.changes["filters"] == cfg["filters"])  # the default is a level
    for lv in levels:  # counts in multiples of 8, the closest to the default's cost under the cap on it
        assert 0.8 <= rx.cnn_macs({**cfg, **lv.changes}) / target <= rx.FULL_PLAN.macs_cap, lv
        assert all(int(n) % 8 == 0 for n in lv.changes["filters"].split(",")), lv


def test_the_grid_starts_at_the_stated_start_config_and_keeps_its_recipe():
    for model in ("mlp", "cnn"):
        start = rx.start_config(model, rx.FULL_PLAN)
        assert start == rx.START[model] and set(start) == set(rx.config_class(model)().to_dict())
        spec = rx.make_spec(model, "x", "y", 1, start, rx.FULL_PLAN.cnn_grid, "grid", rx.FULL_PLAN)
        changed = {k for k in start if spec.config[k] != start[k]}
        assert changed <= {"seed", "subset", "epochs", "device"}  # the reduced budget only


def test_run_keys_cover_config_budget_and_role_but_not_the_device():
    base = rx.START["cnn"]
    spec = rx.make_spec("cnn", "s", "v", 0, base, rx.FULL_PLAN.cnn_grid, "grid", rx.FULL_PLAN)
    same = rx.make_spec("cnn", "other", "label", 0, {**base, "device": "cuda"}, rx.FULL_PLAN.cnn_grid, "grid",
                        rx.FULL_PLAN)
    assert spec.key == same.key
    for other in (rx.make_spec("cnn", "s", "v", 1, base, rx.FULL_PLAN.cnn_grid, "grid", rx.FULL_PLAN),
                  rx.make_spec("cnn", "s", "v", 0, {**base, "lr": 1e-2}, rx.FULL_PLAN.cnn_grid, "grid", rx.FULL_PLAN),
                  rx.make_spec("cnn", "s", "v", 0, base, rx.FULL_PLAN.cnn_final, "grid", rx.FULL_PLAN),
                  rx.make_spec("cnn", "s", "v", 0, base, rx.FULL_PLAN.cnn_grid, "final", rx.FULL_PLAN)):
        assert other.key != spec.key


def test_a_bad_level_stops_the_plan_before_anything_trains():
    with pytest.raises(study_results.StudyError, match="kernel_size"):
        rx.make_spec("cnn", "cnn_kernel", "9", 0, {**rx.START["cnn"], "kernel_size": 9},
                     rx.FULL_PLAN.cnn_grid, "grid", rx.FULL_PLAN)


def test_the_committed_results_are_what_the_code_would_run():
    """Replaying the full study's decisions over the committed results asks for no run that is not there."""
    registry = study_results.Registry(REPO / "results", log=lambda *a: None)

    class Replay(FakeEngine):
        def run(self, specs):
            missing = [f"{s.study}/{s.variant}/seed {s.seed}" for s in specs if s.key not in registry]
            assert not missing, f"the committed results lack {missing[:3]}"
            return [registry.records[s.key] for s in specs]
    study = rx.Study(Replay(None), rx.FULL_PLAN)
    study.run()
    # The same decisions, byte for byte, in the same order (the tracks' threads finish in any order).
    assert (REPO / "results" / "manifest.json").read_text() == json.dumps(study.manifest(), indent=1)


def test_after_a_winning_depth_of_zero_the_width_stage_tries_one_hidden_layer():
    study = rx.Study(FakeEngine(lambda s: 0.9 - 0.01 * len(s.config["hidden"])), rx.FULL_PLAN, only="mlp")
    cfg = rx.start_config("mlp", rx.FULL_PLAN)
    for sid in ("mlp_activation", "mlp_depth", "mlp_width"):
        cfg = study.run_stage(rx.STAGE[sid], cfg)
    assert study.stages["mlp_depth"]["winner"] == "0" and study.stages["mlp_width"]["incumbent"] == "incumbent"
    assert cfg["hidden"] == []  # one hidden layer of any width loses to none here


def test_the_module_defaults_are_the_models_the_study_kept():
    """python mlp_scratch.py and python cnn_torch.py train the study's answer (results/summary.json)."""
    summary = study_results.loads((REPO / "results" / "summary.json").read_text())
    for model in ("mlp", "cnn"):
        kept, default = summary[model]["config"], rx.config_class(model)().to_dict()
        assert {k: v for k, v in kept.items() if k not in ("seed", "device")} == \
            {k: v for k, v in default.items() if k not in ("seed", "device")}, model


# ---------------------------------------------------------------------------------- tiny studies, real workers

def test_a_study_touches_the_test_set_only_in_its_final_runs(mlp_study):
    out, study = mlp_study
    records = study_results.Registry(out).records.values()
    assert study.executed and all(r["plan"] == "quick" for r in records)
    for r in records:
        assert ("test_acc" in r) == (r["role"] == "final"), r["study"]
    finals = study.finals["mlp"]
    assert len(finals["seeds"]) == len(rx.QUICK_PLAN.mlp_final_seeds)
    assert {"mlp_final", "mlp_activation", "mlp_lr"} <= {r["study"] for r in records}


def test_a_study_measures_both_models_at_initialisation(mlp_study):
    """Even a one-track study writes the statistics at initialisation of both models (the report's init figure)."""
    stats = (mlp_study[0] / "init_stats.csv").read_text()
    assert "cnn,he,True" in stats and "cnn,he,False" in stats and "mlp,xavier,False" in stats


def test_a_second_start_trains_nothing(mlp_study, synthetic_splits, tiny_plan):
    out, first = mlp_study
    wall = study_results.loads((out / "summary.json").read_text())["study"]["wall_seconds"]
    again = _study(out, synthetic_splits, tiny_plan)
    assert again.executed == [] and again.finals == first.finals
    assert study_results.loads((out / "summary.json").read_text())["study"]["wall_seconds"] == wall  # kept


def test_a_study_resumes_after_losing_runs_and_a_final_model(mlp_study, synthetic_splits, tiny_plan, tmp_path):
    out, first = mlp_study
    copy = _copy(out, tmp_path)
    runs = sorted((copy / "runs").glob("*.json"))
    runs[0].unlink()
    runs[1].write_text("[]")  # damaged: set aside and retrained
    final = study_results.Registry(copy).records[first.finals["mlp"]["seeds"][0]]
    (copy / final["model_file"]).unlink()
    again = _study(copy, synthetic_splits, tiny_plan)
    assert sorted(again.executed) == sorted([runs[0].stem, runs[1].stem, final["key"]])
    assert (copy / "runs" / f"{runs[1].name}.bad").exists()
    assert _vals(copy) == _vals(out)  # the same numbers again


def test_a_rebuild_without_any_run_record_changes_nothing(mlp_study, synthetic_splits, tmp_path):
    copy = _copy(mlp_study[0], tmp_path)
    for p in (copy / "runs").glob("*.json"):
        p.unlink()
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    with pytest.raises(study_results.StudyError, match=r"^\d+ of the \d+ runs that manifest.json lists are missing"):
        study_results.rebuild_outputs(copy, log=lambda *a: None)
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before


def test_a_record_under_another_runs_name_or_with_impossible_values_is_set_aside(mlp_study, tmp_path):
    copy = _copy(mlp_study[0], tmp_path)
    runs = sorted((copy / "runs").glob("*.json"))
    stray = copy / "runs" / f"backup-{runs[0].name}"
    stray.write_text(runs[0].read_text().replace('"val_acc": ', '"val_acc": 0.99, "x": '))  # a hand-made copy
    assert json.loads(stray.read_text())["val_acc"] == 0.99
    damaged = json.loads(runs[1].read_text())
    runs[1].write_text(json.dumps({**damaged, "val_acc": 1.7}))
    warnings = []
    registry = study_results.Registry(copy, log=warnings.append)
    assert runs[0].stem in registry and runs[1].stem not in registry
    assert registry.records[runs[0].stem]["val_acc"] != 0.99
    assert any(f"it holds run {runs[0].stem}, not backup-{runs[0].stem}" in w for w in warnings)
    assert any("wrong type or value of val_acc" in w for w in warnings)


def _main(capsys, *args) -> tuple[int, str]:
    """The exit code and stderr of the command line, in this process (the tests that run `python
    run_experiments.py` cover its __main__)."""
    try:
        code = cli.run(rx.main, "run_experiments.py", list(args))
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    return code, capsys.readouterr().err


def test_an_unavailable_device_stops_with_one_line_and_records_nothing(tmp_path, capsys):
    code, err = _main(capsys, "--quick", "--only", "cnn", "--device", "cuda:7", "--results-dir", str(tmp_path))
    assert code == 1 and err.count("\n") == 1 and "--device cuda:7" in err
    assert not list(tmp_path.glob("runs/*.json"))


@pytest.mark.parametrize("args", [["--seeds", "-1"], ["--seeds", "99999999999"], ["--final-seeds", "a"],
                                  ["--workers", "0"], ["--threads", "0"], ["--threads", "x"], ["--data-dir", ""],
                                  ["--scheduler", ""], ["--no-report"]])
def test_bad_flags_get_one_line(args, tmp_path, capsys):
    code, err = _main(capsys, *args, "--results-dir", str(tmp_path / "r"))
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_an_address_that_is_no_dask_scheduler_gets_one_line():
    from distributed import Client
    for bad in ("garbage", "http://127.0.0.1:1"):
        with pytest.raises(rx.StudyError, match=f"scheduler at {bad}: ValueError: "):
            rx._connect(bad, Client)
    with socket.socket() as server:  # listens, never answers: a handshake that would wait forever
        server.bind(("127.0.0.1", 0))
        server.listen()
        with pytest.raises(rx.StudyError, match="no Dask handshake within 1 s"):
            rx._connect(f"tcp://127.0.0.1:{server.getsockname()[1]}", Client, seconds=1)


def test_an_unwritable_results_folder_stops_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = _run_cli("--quick", "--results-dir", str(blocker / "sub"))
    assert proc.returncode == 1 and proc.stderr == f"run_experiments.py: error: {blocker} is a file, not a folder\n"


def test_a_second_study_on_the_same_folder_is_refused(tmp_path, synthetic_splits, tiny_plan):
    with study_results.results_lock(tmp_path):
        with pytest.raises(study_results.StudyError, match=f"pid {os.getpid()}"):
            _study(tmp_path, synthetic_splits, tiny_plan)


# The script itself (its __main__ block), on the synthetic data and the tiny plan of conftest.py.
TINY_SCRIPT = """
import runpy, sys
import preprocessing, run_experiments
sys.path.insert(0, "tests")
import conftest
preprocessing.load_splits = lambda *a, **k: conftest.make_synthetic_splits()
run_experiments.QUICK_PLAN = conftest.make_tiny_plan()
sys.argv = ["run_experiments.py", *sys.argv[1:]]
runpy.run_path("run_experiments.py", run_name="__main__")
"""


def test_ctrl_c_stops_with_one_line_and_keeps_the_finished_runs(tmp_path):
    """A real SIGINT to the whole process group once the first run is saved (the initialisation statistics,
    10 s of work tested elsewhere, are there already)."""
    (tmp_path / "init_stats.csv").write_text("made before the study\n")
    proc = subprocess.Popen([sys.executable, "-c", TINY_SCRIPT, "--quick", "--only", "mlp",
                             "--results-dir", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob("runs/*.json")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().count("\n") == 0 and "run the same command again to resume" in err
    assert list(tmp_path.glob("runs/*.json"))


def _copy(folder, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(folder), str(copy)], check=True)
    return copy


def test_plots_only_on_an_empty_or_missing_folder_or_a_file_refuses_and_creates_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    for folder in (tmp_path / "empty", tmp_path / "missing", tmp_path / "a_file"):
        code, err = _main(capsys, "--plots-only", "--results-dir", str(folder))
        assert code == 1 and err.count("\n") == 1 and "holds no study results" in err
    assert not (tmp_path / "missing").exists() and not any((tmp_path / "empty").iterdir())


def test_plots_only_with_runs_missing_refuses_and_keeps_the_summary(mlp_study, tmp_path, capsys):
    copy = _copy(mlp_study[0], tmp_path)
    for p in sorted((copy / "runs").glob("*.json"))[:2]:
        p.unlink()
    before = (copy / "summary.json").read_bytes()
    code, err = _main(capsys, "--plots-only", "--results-dir", str(copy))
    assert code == 1 and err.count("\n") == 1, err
    assert "error: 2 of the" in err and "run the study" in err
    assert (copy / "summary.json").read_bytes() == before


def test_ctrl_c_while_rebuilding_the_outputs_exits_130_in_one_line(mlp_study, tmp_path):
    copy = _copy(mlp_study[0], tmp_path)
    (copy / ".lock").unlink()
    proc = subprocess.Popen([sys.executable, "run_experiments.py", "--plots-only", "--results-dir", str(copy)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 60
    while not (copy / ".lock").exists() and time.time() < deadline:  # the rebuild has started
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().count("\n") == 0 and "interrupted" in err, err


CTRL_C_MID_TRANSFER = """
import sys, distributed, run_experiments as rx
client, cluster = rx.start_client(2)
try:
    future = client.submit(bytes, 300_000_000, pure=False)  # a result that takes a while to send
    distributed.wait(future)
    print("collecting", flush=True)
    future.result()
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
finally:
    client.close()
    cluster.close()
"""


def test_ctrl_c_while_a_result_is_in_transfer_prints_no_dask_traceback():
    # CI once caught the race: Ctrl-C closed the client while a worker was sending a run, and the worker and the
    # scheduler logged the broken connection with tracebacks. A big result makes the race certain.
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_MID_TRANSFER], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline() == "collecting\n"
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert err.strip() == "interrupted"


def _run_cli(*args):
    return subprocess.run([sys.executable, "run_experiments.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def dask_cluster():
    """A real scheduler and two single-threaded workers on 127.0.0.1, as `dask scheduler` / `dask worker`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_": "None"}
    python_m = [sys.executable, "-m"]
    procs = [subprocess.Popen([*python_m, "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--no-dashboard"], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    # no wait for the scheduler to listen: a worker retries until it does
    procs += [subprocess.Popen([*python_m, "distributed.cli.dask_worker", address, "--nthreads", "1",
                                "--no-dashboard", "--memory-limit", "0"], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    from distributed import Client
    with Client(address, timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
    yield address
    for p in procs:
        p.kill()  # nothing of theirs needs to outlive the tests
        p.wait(timeout=30)


def _with_init_stats_of(study_folder: Path, folder: Path) -> None:
    """A study computes its initialisation statistics (10 s) only where they are missing: these tests are about
    the runs, so they start with the local study's."""
    shutil.copy(study_folder / "init_stats.csv", folder / "init_stats.csv")


def test_a_study_on_a_dask_scheduler_gives_the_local_records(dask_cluster, mlp_study, synthetic_splits,
                                                              tiny_plan, tmp_path):
    out, _ = mlp_study
    _with_init_stats_of(out, tmp_path)
    remote = _study(tmp_path, synthetic_splits, tiny_plan, "--scheduler", dask_cluster)
    assert remote.executed and _vals(tmp_path) == _vals(out)


def test_a_worker_killed_mid_study_costs_only_its_run(dask_cluster, mlp_study, synthetic_splits, tiny_plan,
                                                      tmp_path):
    from distributed import Client
    with Client(dask_cluster) as client:
        victim = next(iter(client.run(os.getpid).values()))

    def kill_after_first_record():
        deadline = time.time() + 60
        while not list(tmp_path.glob("runs/*.json")) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
    _with_init_stats_of(mlp_study[0], tmp_path)
    killer = threading.Thread(target=kill_after_first_record)
    killer.start()
    _study(tmp_path, synthetic_splits, tiny_plan, "--scheduler", dask_cluster)
    killer.join()
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)
    assert _vals(tmp_path) == _vals(mlp_study[0])  # complete, and the same numbers


@pytest.fixture(scope="module")
def local_client():
    """One local cluster of two workers (as the study starts it) for the tests that drive an Engine."""
    client, cluster = rx.start_client(2)
    yield client
    client.close()
    cluster.close()


def test_a_run_in_flight_or_done_is_never_trained_twice(local_client, synthetic_splits, tiny_plan, tmp_path):
    registry = study_results.Registry(tmp_path, log=lambda *a: None)
    engine = rx.Engine(local_client, synthetic_splits, registry, device="cpu", log=lambda *a: None)
    study = rx.Study(engine, tiny_plan, only="mlp")
    specs = study.final_specs("mlp", "start", rx.start_config("mlp", tiny_plan), "final")
    engine.start(specs)
    engine.start(specs)  # already in flight: not submitted again
    assert len(engine.in_flight) == len(specs) and engine.bar.total == len(specs)
    first = engine.run(specs[:1])
    assert set(study_results.Registry(tmp_path).records) >= {specs[0].key} == {first[0]["key"]}
    engine.run(specs)
    engine.run(specs)  # done: nothing submitted
    assert sorted(engine.executed) == sorted(s.key for s in specs) and engine.submitted == len(specs)
    engine.bar.close()


def _kill_own_worker(spec, splits, threads, device):
    os._exit(1)  # as the kernel's out-of-memory killer would


def test_a_run_that_kills_every_worker_it_runs_on_stops_the_study_in_one_line(synthetic_splits, tiny_plan,
                                                                                  tmp_path):
    import importlib
    import dask
    importlib.import_module("distributed")  # its config defaults first, or leaving the `with` would drop them all
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):  # two deaths, not four: a faster test
        client, cluster = rx.start_client(2)
    try:
        registry = study_results.Registry(tmp_path, log=lambda *a: None)
        engine = rx.Engine(client, synthetic_splits, registry, device="cpu", log=lambda *a: None,
                           runner=_kill_own_worker)
        spec = rx.Study(engine, tiny_plan).final_specs("mlp", "start", rx.start_config("mlp", tiny_plan), "final")[0]
        with pytest.raises(rx.StudyError, match=r"^mlp_final start seed 0 \(run \w+\) killed the worker "
                                                r"running it 2 times \(out of memory\?\); finished runs are kept"):
            engine.run([spec])
        assert not registry.records
    finally:
        client.close()
        cluster.close()


def test_both_tracks_with_one_seed_build_every_output(mlp_study, tmp_path, synthetic_splits, tiny_plan):
    plan = dataclasses.replace(tiny_plan, mlp_seeds=(0,), cnn_seeds=(0,), mlp_final_seeds=(0,), cnn_final_seeds=(0,))
    _with_init_stats_of(mlp_study[0], tmp_path)
    study = rx.run_study(rx.parse_args(["--results-dir", str(tmp_path)]), splits=synthetic_splits,
                         plan=plan, log=lambda *a: None, plots=False)
    summary = study_results.loads((tmp_path / "summary.json").read_text())
    assert set(study.finals) == {"mlp", "cnn"} and summary["mlp"]["test_acc_std"] is None
    assert {"cnn_ablation", "cnn_init", "mlp_lr"} <= set(summary["stages"])
    assert np.isfinite(summary["cnn"]["test_acc"])


def test_a_level_over_the_multiply_add_cap_is_shown_but_cannot_win():
    stage, asked = _decide(lambda s: s.config["hidden"][0] / 1e4, study="mlp_width")
    assert stage["levels"] == ["768", "1024", "1536"] and stage["contrast"] == ["1536"]
    assert stage["macs_capped"] == ["1536"] and stage["winner"] == "1024" and not stage["extended"]
    assert {s.variant for s in asked} == {"768", "1024", "1536"}
    assert stage["macs_ratio"] == {"768": 0.644, "1024": 1.0, "1536": 1.922}  # 3,578,880 / 1,861,632
    stage, _ = _decide(lambda s: -s.config["hidden"][0] / 1e4, study="mlp_width")
    assert stage["winner"] == "512" and stage["extended"] and stage["macs_capped"] == ["1536"]  # cheaper is fine


def test_the_cap_is_on_multiply_adds_not_on_measured_seconds():
    """Seconds vary from run to run at the same arithmetic; a level that merely ran slower can still win, so the
    decisions are the same on every run and machine."""
    slow_leaky = lambda s: 30.0 if s.variant == "leaky_relu" else 10.0  # noqa: E731
    stage, _ = _decide(lambda s: 0.9 if s.variant == "leaky_relu" else 0.8, study="mlp_activation", seconds=slow_leaky)
    assert stage["winner"] == "leaky_relu" and stage["macs_capped"] == [] and stage["time_ratio"]["leaky_relu"] == 3.0
    assert set(stage["macs_ratio"].values()) == {1.0}


def test_a_ctrl_c_while_the_cluster_closes_waits_for_the_close_then_interrupts():
    closed = []
    with pytest.raises(KeyboardInterrupt):
        with rx.ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the signal is delivered here, and held
            closed.append(True)
    assert closed and signal.getsignal(signal.SIGINT) is signal.default_int_handler
