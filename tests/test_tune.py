"""nin tune: the search space, pruning, workers sharing one SQLite study, best.yaml, continuing, divergence, errors."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from nin.cli.main import main
from nin.experiments.tune import Dim, PruningCallback, parse_space, search_space, table
from nin.training import run
from nin.training.config import load_config, load_run_config

optuna = pytest.importorskip("optuna")

TINY = ["--subset", "256", "--holdout", "128", "--max-epochs", "1", "--threads", "1", "--quiet"]


def load(out: Path):
    return optuna.load_study(study_name="nin-tune", storage=f"sqlite:///{out / 'tune.db'}")


def tune(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["tune", *argv])
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------ the space


def test_the_search_space_is_a_table_of_train_settings():
    space = {d.name: d for d in search_space(max_epochs=4)}
    assert list(space) == ["lr", "batch_size", "weight_decay", "schedule", "epochs"]
    assert space["lr"] == Dim("lr", "float", 1e-3, 0.5, log=True)
    assert space["batch_size"].choices == (64, 128, 256)
    assert space["schedule"].choices == ("constant", "cosine", "onecycle", "step")
    assert (space["epochs"].kind, space["epochs"].low, space["epochs"].high) == ("int", 1, 4)
    fixed = optuna.trial.FixedTrial({"lr": 0.01, "batch_size": 64, "weight_decay": 1e-4, "schedule": "step",
                                     "epochs": 2})
    assert {d.name: d.suggest(fixed) for d in space.values()}["epochs"] == 2
    assert space["lr"].describe() == "lr 0.001..0.5 (log)"


def test_space_overrides_keep_scales_type_check_and_add_settings():
    space = {d.name: d for d in parse_space(["lr=1e-4..1", "schedule=cosine,onecycle", "momentum=0.8..0.95:linear",
                                             "batch_size=32", "epochs=2..5"], max_epochs=3)}
    assert space["lr"] == Dim("lr", "float", 1e-4, 1.0, log=True)  # lr stays log-scaled
    assert space["schedule"].choices == ("cosine", "onecycle")
    assert space["momentum"] == Dim("momentum", "float", 0.8, 0.95, log=False)
    assert space["batch_size"].choices == (32,)
    assert space["epochs"] == Dim("epochs", "int", 2, 5)
    for bad, says in [("nope=1", "unknown setting 'nope'"), ("schedule=linear", "schedule must be one of"),
                      ("lr=1..0.1", "low < high"), ("lr", "KEY=LOW..HIGH"), ("lr=-1..1:log", "lr must be > 0"),
                      ("batch_size=big", "batch_size must be int")]:
        with pytest.raises(Exception, match=says):
            parse_space([bad])


def test_tune_flags_are_the_config_fields_and_only_what_is_given_changes():
    from dataclasses import fields

    from nin.cli.main import build_parser
    from nin.cli.options import given_fields
    from nin.experiments.tune import TuneConfig

    parse = build_parser().parse_args
    actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["tune"]._actions}
    documented = [f for f in fields(TuneConfig) if f.metadata.get("help")]
    assert {f.name for f in documented} == {"trials", "workers", "holdout", "subset", "max_epochs", "startup_trials",
                                            "storage", "study_name", "threads", "out", "quiet"}
    for f in documented:
        assert actions[f.name].help == f.metadata["help"] and actions[f.name].default is None, f.name
    args = parse(["tune", "--trials", "3", "--quiet", "--max-epochs", "2", "--study-name", "s", "--out", "o"])
    given = given_fields(args, TuneConfig)
    assert given == {"trials": 3, "quiet": True, "max_epochs": 2, "study_name": "s", "out": "o"}
    tc = TuneConfig(**given)
    assert (tc.workers, tc.startup_trials, tc.storage, tc.holdout) == (1, 5, None, None)  # the fields' defaults
    assert tc.out_dir() == Path("o") and TuneConfig().out_dir().parent == Path("runs")
    assert given_fields(parse(["tune"]), TuneConfig) == {}


def test_tune_checks_each_setting_against_its_range_before_anything_else():
    from nin.errors import NinError
    from nin.experiments.tune import TuneConfig, tune

    for bad, says in [({"trials": 0}, r"trials must be in \[1, 100,000\], got 0"),
                      ({"max_epochs": 0}, r"max_epochs must be in \[1, 10\*\*6\], got 0"),
                      ({"workers": 257}, r"workers must be in \[1, 256\]")]:
        with pytest.raises(NinError, match=says):
            tune(TuneConfig(**bad))


# ------------------------------------------------------------------ pruning


def test_the_pruning_callback_reports_each_epoch_and_prunes_below_the_median():
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    done = study.ask()
    done.report(0.8, 1)
    done.report(0.9, 2)
    study.tell(done, 0.9)
    three_epochs = SimpleNamespace(config=SimpleNamespace(epochs=3), history=[])
    weak = study.ask()
    with pytest.raises(optuna.TrialPruned, match="epoch 1: test_acc 0.3000"):
        PruningCallback(weak).on_epoch_end(three_epochs, {"epoch": 1, "test_acc": 0.3})
    assert study.trials[weak.number].intermediate_values == {1: 0.3}
    study.tell(weak, state=optuna.trial.TrialState.PRUNED)
    rows = table(study.trials).splitlines()
    assert rows[1].split()[:3] == ["0", "complete", "0.9000"]
    assert rows[2].split()[:3] == ["1", "pruned", "(0.3000)"]  # its last reported accuracy, not a final one
    strong = study.ask()
    PruningCallback(strong).on_epoch_end(three_epochs, {"epoch": 1, "test_acc": 0.85})  # above the median: goes on
    last = study.ask()  # a trial's last epoch is never pruned: stopping there saves nothing
    PruningCallback(last).on_epoch_end(SimpleNamespace(config=SimpleNamespace(epochs=1), history=[]),
                                       {"epoch": 1, "test_acc": 0.1})


# ------------------------------------------------------------------ whole searches


@pytest.fixture(scope="module")
def shared(tmp_path_factory, fashion_mnist, one_thread) -> tuple[Path, str]:
    """Two worker processes sharing one SQLite study: 3 trials (2 and 1)."""
    out = tmp_path_factory.mktemp("tune") / "search"
    code, stdout, err = tune("--trials", "3", "--workers", "2", "--startup-trials", "2", "--out", str(out), *TINY)
    assert code == 0, err
    return out, stdout


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(shared):
    out, stdout = shared
    trials = load(out).trials
    assert len(trials) == 3 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers ran trials
    for t in trials:
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir == (out / "trials" / str(t.number)).resolve() and (run_dir / "config.json").exists()
        assert {"wall_time", "epochs_run", "host"} <= set(t.user_attrs)
        assert t.params["epochs"] == 1 and t.params["batch_size"] in (64, 128, 256)
    assert "trial  state     holdout acc  lr" in stdout and "best: trial" in stdout


@pytest.mark.slow
def test_best_yaml_is_the_best_trial_without_the_holdout_and_trains(shared, tmp_path):
    out, _ = shared
    best = load(out).best_trial
    cfg = load_config(out / "best.yaml")
    assert cfg.data.holdout is None and cfg.data.subset is None  # the full training set, scored on the test set
    for key, value in best.params.items():
        assert getattr(cfg.train, key) == value
    trial_cfg = load_run_config(Path(best.user_attrs["run_dir"]))
    assert (trial_cfg.data.holdout, trial_cfg.data.subset) == (128, 256)
    assert trial_cfg.train == cfg.train
    # nin train --config best.yaml loads it (here cut short: a few images, two steps)
    code = main(["train", "--config", str(out / "best.yaml"), "--subset", "128", "--test-subset", "64",
                 "--max-steps", "2", "--threads", "1", "--out", str(tmp_path / "final"), "--quiet"])
    assert code == 0
    assert load_run_config(tmp_path / "final").data.holdout is None


@pytest.mark.slow
def test_an_existing_out_dir_is_continued_not_overwritten(shared):
    out, _ = shared
    before = {t.number: t.params for t in load(out).trials}
    code, _, err = tune("--trials", "1", "--startup-trials", "2", "--out", str(out), *TINY)
    assert code == 0, err
    after = load(out).trials
    assert len(after) == 4 and {t.number: t.params for t in after[:3]} == before
    assert sorted(int(p.name) for p in (out / "trials").iterdir()) == [0, 1, 2, 3]
    # continuing with another space or setting would mix incomparable trials: refused
    code, _, err = tune("--trials", "1", "--out", str(out), *TINY, "--max-epochs", "2")
    assert code == 2 and "searched another space (lr 0.001..0.5 (log)" in err and err.count("\n") == 1
    code, _, err = tune("--trials", "1", "--out", str(out), *TINY, "--subset", "200")
    assert code == 2 and "was run with data.subset=256, this run has 200" in err


@pytest.mark.slow
def test_a_diverged_trial_is_recorded_and_the_search_goes_on(tmp_path, fashion_mnist, one_thread, monkeypatch,
                                                            capsys):
    """Trial 0 gets an absurd learning rate on a model without BatchNorm: its loss really goes to NaN."""
    real_train = run.train

    def train(cfg, out, **kw):
        if Path(out).name == "0":
            cfg.train.lr, cfg.train.schedule = 1e6, "constant"
        return real_train(cfg, out, **kw)

    monkeypatch.setattr(run, "train", train)
    config = tmp_path / "nobn.yaml"
    config.write_text("model:\n  options: {batch_norm: false}\n")
    argv = ["tune", "--config", str(config), "--trials", "1", "--space", "lr=0.01", "--out", str(tmp_path / "t"), *TINY]
    assert main(argv) == 1  # nothing has finished yet: no best config
    assert "no trial has finished" in capsys.readouterr().out and not (tmp_path / "t" / "best.yaml").exists()
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    diverged, ok = load(tmp_path / "t").trials
    assert diverged.state.name == "PRUNED" and diverged.user_attrs["diverged"] is True
    assert diverged.user_attrs["step"] >= 1 and diverged.user_attrs["loss"] in ("nan", "inf", "-inf")
    assert ok.state.name == "COMPLETE" and "diverged" not in ok.user_attrs
    assert "\n0      diverged  -" in stdout and "best: trial 1," in stdout
    assert (tmp_path / "t" / "best.yaml").exists()


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("argv, says", [
    (["--workers", "0"], "tune: argument --workers: expected an integer in [1, 256], got '0'"),
    (["--trials", "0"], "tune: argument --trials: expected an integer in [1, 100,000], got '0'"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--space", "lr"], "--space items look like KEY=LOW..HIGH"),
    (["--storage", "nodb://x"], "--storage nodb://x: cannot open it"),
    (["--holdout", "60000"], "--holdout must be between 1 and 59999, got 60000"),
    (["--holdout", "100", "--subset", "59950"], "--subset must be between 1 and 59900"),
])
def test_bad_flags_are_one_line_errors(argv, says, tmp_path, fashion_mnist, capsys):
    assert main(["tune", "--out", str(tmp_path / "t"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nin: error: ") and says in err and err.count("\n") == 1


@pytest.mark.slow
def test_bad_config_files_and_out_dirs_and_studies_are_one_line_errors(tmp_path, fashion_mnist, capsys,
                                                                       monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    minimizing = tmp_path / "min"
    minimizing.mkdir()
    optuna.create_study(study_name="nin-tune", storage=f"sqlite:///{minimizing / 'tune.db'}", direction="minimize")
    cases = [
        (["--config", str(bad)], "not valid YAML"),
        (["--out", str(other)], "is not a nin tune directory"),
        (["--out", str(minimizing)], "study 'nin-tune' in sqlite:///"),
        (["--storage", f"sqlite:///{tmp_path}/no/such/dir/x.db"], "cannot open it"),
    ]
    for argv, says in cases:
        assert main(["tune", "--out", str(tmp_path / "t"), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("nin: error: ") and says in err and err.count("\n") == 1, err
    assert "minimizes" in main_err(["--out", str(minimizing)], capsys)
    monkeypatch.setitem(sys.modules, "optuna", None)  # not installed
    assert "pip install optuna (or pip install 'nin[tune]')" in main_err(["--out", str(tmp_path / "u")], capsys)


def main_err(argv: list[str], capsys) -> str:
    assert main(["tune", *argv]) == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------ --storage URLs


def storage_err(url: str, tmp_path: Path, monkeypatch, capsys) -> str:
    """``nin tune --storage URL``: exit 2 with one line, before any data is read and with nothing written."""
    def no_data(*args, **kwargs):
        raise AssertionError("the data set was read before the storage was opened")

    monkeypatch.setattr(run, "build", no_data)
    before = sorted(tmp_path.rglob("*"))
    code = main(["tune", "--storage", url, "--trials", "1", "--out", str(tmp_path / "t"), *TINY])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("nin: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "secret" not in err  # never a password
    assert sorted(tmp_path.rglob("*")) == before  # nothing under --out, nor anywhere else
    return err


@pytest.mark.parametrize("url, says", [
    ("notaurl://:::", ["--storage: not a database URL: 'notaurl://:::'", "e.g. sqlite:///path/to/tune.db"]),
    ("", ["--storage: not a database URL: ''", "e.g. sqlite:///path/to/tune.db"]),
    ("postgresql://user:secret@host:badport/db", ["not a database URL: 'postgresql://user:***@host:badport/db'"]),
    ("tune.log", ["not a database URL: 'tune.log'", "not in an Optuna journal file"]),
    ("nodb://user:secret@host/db", ["--storage nodb://user:***@host/db: cannot open it: 'nodb' is not a database"]),
    ("postgresql+nope://user:secret@host/db", ["SQLAlchemy has no postgresql driver 'nope'"]),
    ("postgresql+asyncpg://user:secret@127.0.0.1:1/db", ["asyncpg is an asyncio driver, which Optuna cannot use"]),
    ("sqlite://", ["an in-memory SQLite database is gone when nin tune ends"]),
    ("sqlite:////nonexistent-dir/x.db", ["cannot open it: the folder /nonexistent-dir does not exist"]),
])
def test_a_bad_storage_url_is_one_line_before_anything_is_read_or_written(url, says, tmp_path, monkeypatch, capsys):
    assert not Path("/nonexistent-dir").exists()
    err = storage_err(url, tmp_path, monkeypatch, capsys)
    for s in says:
        assert s in err, err


def test_a_sqlite_storage_that_is_a_directory_or_not_a_database_is_one_line(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "dbs"
    folder.mkdir()
    err = storage_err(f"sqlite:///{folder}", tmp_path, monkeypatch, capsys)
    assert f"cannot open it: {folder} is a directory; name a database file, e.g. sqlite:///{folder}/tune.db" in err
    (folder / "file").write_text("not a folder")
    err = storage_err(f"sqlite:///{folder}/file/x.db", tmp_path, monkeypatch, capsys)
    assert f"the folder {folder}/file is not a directory" in err
    (folder / "notes.db").write_text("not a database")
    err = storage_err(f"sqlite:///{folder}/notes.db", tmp_path, monkeypatch, capsys)
    assert f"cannot open it: {folder}/notes.db is not an SQLite database" in err


@pytest.mark.parametrize("url, module, package", [
    ("postgresql+psycopg2://user:secret@127.0.0.1:1/db", "psycopg2", "psycopg2-binary"),
    ("postgresql://user:secret@127.0.0.1:1/db", None, None),  # SQLAlchemy's default driver: psycopg or psycopg2
    ("mysql://user:secret@127.0.0.1:1/db", "MySQLdb", "mysqlclient"),
    ("mysql+pymysql://user:secret@127.0.0.1:1/db", "pymysql", "pymysql"),
])
def test_a_database_url_names_the_driver_to_install_or_the_server_that_does_not_answer(url, module, package,
                                                                                        tmp_path, monkeypatch, capsys):
    import importlib.util

    from sqlalchemy.engine import make_url

    if module is None:
        module, package = {"psycopg": ("psycopg", "'psycopg[binary]'"),
                           "psycopg2": ("psycopg2", "psycopg2-binary")}[make_url(url).get_driver_name()]
    err = storage_err(url, tmp_path, monkeypatch, capsys)
    assert f"--storage {url.replace('secret', '***')}: cannot open it: " in err
    if importlib.util.find_spec(module) is None:
        assert f"is not installed (no module {module!r}); pip install {package}" in err, err
    else:  # the driver is there: nothing listens on port 1
        assert "the database server did not let us in" in err and "check the host, port" in err, err


def test_a_database_that_refuses_is_one_line_without_the_password(tmp_path, monkeypatch, capsys):
    from sqlalchemy.exc import OperationalError

    def refuse(url, **kwargs):
        raise OperationalError("SELECT 1", {}, Exception('connection to server at "db.example" failed: password '
                                                         'authentication failed (tried secret)\nDETAIL: more'))

    monkeypatch.setattr(optuna.storages, "RDBStorage", refuse)
    err = storage_err("postgresql+psycopg2://user:secret@db.example/db", tmp_path, monkeypatch, capsys)
    assert ("--storage postgresql+psycopg2://user:***@db.example/db: cannot open it: the database server did not "
            "let us in (connection to server at \"db.example\" failed: password authentication failed (tried ***))"
            in err), err
