"""`offlab fit / algos / compare / ui` through the CLI: a tiny run end to end, and every bad input as one line, exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from offlab import training
from offlab.cli import app
from offlab.config import RunConfig, resolve_run
from offlab.errors import ConfigError
from tests.helpers import run_cli

TINY = "hopper-tiny"
FAST = ["--steps", "20", "--eval-every", "10", "--eval-episodes", "1", "--set", "hidden=16,16",
        "--set", "dataset_quality=false"]


pytestmark = pytest.mark.usefixtures("tiny_store")


def one_line_error(result, *fragments: str) -> str:
    """Assert exit 2 with a single-line error on stderr holding every fragment; return the line."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def test_fit_from_a_run_file_with_overrides_then_compare(tmp_path):
    (tmp_path / "run.yaml").write_text(
        f"dataset: {TINY}\nalgo: td3bc\nsteps: 10\neval_every: 6\neval_episodes: 1\nseed: 4\n"
        "dataset_quality: false\nalgo_settings:\n  actor_lr: 1.0e-4\n  hidden: [16, 16]\n  alpha: 5\n"
    )
    fitted = run_cli("fit", "--config", "run.yaml", "--set", "alpha=7.5", "--steps", "1.2e1", "--json")  # 12
    assert fitted.returncode == 0, fitted.stderr
    result = json.loads(fitted.stdout)
    assert result["run_name"] == "td3bc-s4" and result["step"] == 12 and not result["interrupted"]
    assert Path(result["checkpoint"]).is_file() and result["model_uri"]
    params = MlflowClient().get_run(result["run_id"]).data.params
    assert params["algo.actor_lr"] == "0.0001"  # from the file
    assert params["algo.alpha"] == "7.5"        # --set beats the file
    assert params["steps"] == "12"              # a flag beats the file
    assert params["seed"] == "4" and params["algo.seed"] == "4" and params["algo.hidden"] == "[16, 16]"

    compared = run_cli("compare", "--dataset", TINY, "--json")
    assert compared.returncode == 0, compared.stderr
    [row] = json.loads(compared.stdout)
    assert row["run_id"] == result["run_id"] and row["algo"] == "td3bc" and row["seed"] == "4"
    assert row["steps"] == 12 and row["final"] == pytest.approx(result["final_eval"]["normalized_score"])
    assert row["trained_steps"] == 12
    table = CliRunner().invoke(app, ["compare", "--dataset", TINY])
    assert table.exit_code == 0 and "td3bc-s4" in table.stdout and "trained" in table.stdout
    # a metric no run logged is a mistake, not a column of blanks
    one_line_error(run_cli("compare", "--dataset", TINY, "--metric", "eval/normalised_score"),
                   "no run of 'hopper-tiny' logged 'eval/normalised_score'", "did you mean 'eval/normalized_score'",
                   "logged: eval/normalized_score")


def test_fit_json_keeps_the_progress_bar_on_a_terminal_and_off_a_pipe():
    """`--json` is for scripts reading stdout; a person watching a terminal's stderr still sees the bar."""
    import pty
    import subprocess
    import sys
    import threading

    # rich's own overrides of terminal detection stay out of it
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}

    def fit_json(stderr_on_a_terminal: bool) -> tuple[dict, str]:
        cmd = [sys.executable, "-m", "offlab.cli", "fit", "--dataset", TINY, "--algo", "bc", *FAST, "--json"]
        if not stderr_on_a_terminal:
            done = run_cli(*cmd[3:], env=env)
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout), done.stderr
        main_fd, term_fd = pty.openpty()
        seen = bytearray()

        def drain():  # read as it comes, so a full terminal buffer never blocks the run
            while True:
                try:
                    chunk = os.read(main_fd, 4096)
                except OSError:  # the run closed its end
                    return
                if not chunk:
                    return
                seen.extend(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=term_fd, env=dict(env, TERM="xterm"))
        os.close(term_fd)
        out, _ = proc.communicate(timeout=600)
        reader.join(timeout=30)
        os.close(main_fd)
        assert proc.returncode == 0, seen.decode(errors="replace")
        return json.loads(out), seen.decode(errors="replace")

    on_terminal, shown = fit_json(stderr_on_a_terminal=True)
    assert on_terminal["step"] == 20 and "bc hopper-tiny" in shown and "20/20" in shown
    piped, logged = fit_json(stderr_on_a_terminal=False)
    assert piped["step"] == 20 and "20/20" not in logged and "bc hopper-tiny" not in logged


def test_compare_flags_runs_that_trained_on_different_builds_of_a_dataset(hopper_random):
    from offlab.data.store import write_dataset
    from tests.helpers import make_sim_dataset

    def fit(seed: int):
        run, _ = resolve_run(None, {"dataset": TINY, "algo": "bc", "steps": 4, "eval_every": 4, "eval_episodes": 1,
                                    "seed": seed}, ["hidden=8", "dataset_quality=false"])
        return training.fit(run, progress=False)

    first = fit(0)
    same = CliRunner().invoke(app, ["compare", "--dataset", TINY])
    assert same.exit_code == 0 and "different builds" not in same.stdout
    # the same name rebuilt with other data (as another simulator version would give)
    rebuilt = write_dataset(make_sim_dataset("Hopper-v5", steps=1000, seed=1, name=TINY), TINY, overwrite=True)
    assert rebuilt.card.content_hash != hopper_random.card.content_hash
    second = fit(1)

    rows = {r["run_id"]: r for r in json.loads(run_cli("compare", "--dataset", TINY, "--json").stdout)}
    assert rows[first.run_id]["dataset_hash"] == hopper_random.card.content_hash
    assert rows[second.run_id]["dataset_hash"] == rebuilt.card.content_hash
    table = run_cli("compare", "--dataset", TINY, env=dict(os.environ, COLUMNS="200"))
    assert table.returncode == 0, table.stderr
    assert "2 different builds of 'hopper-tiny'" in table.stdout
    assert hopper_random.card.content_hash[:8] in table.stdout and rebuilt.card.content_hash[:8] in table.stdout


@pytest.mark.parametrize("args, fragments", [
    (["--dataset", TINY, "--algo", "td3bcc"], ["unknown learner 'td3bcc'", "did you mean 'td3bc'", "bc", "prdc"]),
    (["--dataset", "hoper-medium", "--algo", "bc"], ["dataset 'hoper-medium'", "did you mean 'hopper-medium'"]),
    (["--dataset", TINY, "--algo", "td3bc", "--set", "actor_lrr=1e-4"],
     ["unknown setting 'actor_lrr'", "did you mean 'actor_lr'", "valid keys:", "critic_lr"]),
    (["--dataset", TINY, "--algo", "td3bc", "--set", "alpha=strong"], ["'alpha' expects float, got 'strong'"]),
    (["--dataset", TINY, "--algo", "td3bc", "--ope", "fqe,pdsi"], ["unknown estimator 'pdsi'", "did you mean 'pdis'"]),
    # click's own usage errors, one line too (not typer's boxed panel)
    (["--dataset", TINY, "--algo", "td3bc", "--online-steps", "1.5"],
     ["'--online-steps'", "'1.5' is not a whole number", "2e5", "see `offlab fit --help`"]),
    (["--dataset", TINY, "--algo", "td3bc", "--stepz", "3"], ["No such option: --stepz", "--steps", "offlab fit --help"]),
], ids=["unknown-algo", "unknown-dataset", "unknown-set-key", "wrong-set-type", "unknown-ope-estimator",
        "not-a-whole-number", "unknown-flag"])
def test_bad_input_is_one_line_and_exit_2(args, fragments):
    one_line_error(run_cli("fit", *args, *FAST), *fragments)


def test_an_unknown_command_is_one_line_and_exit_2():
    one_line_error(run_cli("fitt"), "No such command 'fitt'", "fit", "see `offlab --help`")


def test_a_config_file_that_does_not_parse(tmp_path):
    (tmp_path / "broken.yaml").write_text("dataset: hopper-medium\nalgo: [td3bc\n")
    one_line_error(run_cli("fit", "--config", "broken.yaml"), "broken.yaml is not valid YAML", "line 3")


def test_resume_of_a_missing_run_or_another_dataset():
    run, _ = resolve_run(None, {"dataset": TINY, "algo": "bc", "steps": 4, "eval_episodes": 0},
                         ["hidden=8", "dataset_quality=false"])
    run_id = training.fit(run, progress=False).run_id
    one_line_error(run_cli("fit", "--resume", run_id, "--dataset", "hopper-medium"),
                   f"run '{run_id}' belongs to dataset '{TINY}', not 'hopper-medium'")
    one_line_error(run_cli("fit", "--resume", "0123456789abcdef0123456789abcdef"),
                   "no run '0123456789abcdef0123456789abcdef' in the tracking store")


def test_an_unreachable_tracking_server_is_reported_before_training():
    env = dict(os.environ, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    one_line_error(run_cli("fit", "--dataset", TINY, "--algo", "bc", *FAST, env=env),
                   "http://127.0.0.1:9 is not reachable")
    assert not (Path(os.environ["OFFLAB_HOME"]) / "runs").exists()  # no training started


def test_more_bad_settings_name_the_problem(tmp_path):
    """The same checks as above, called in-process for the cases that need no subprocess."""
    cases = [
        ({"dataset": TINY, "algo": "td3bc"}, ["policy_freq=1.5"], "'policy_freq' expects int, got '1.5'"),
        ({"dataset": TINY, "algo": "td3bc"}, ["alpha"], "must look like key=value"),
        ({"dataset": TINY, "algo": "td3bc"}, ["dataset=other"], "--set cannot change dataset"),
        ({"algo": "bc"}, [], "no dataset given"),
        ({"dataset": TINY, "algo": "bc", "steps": -1}, [], "steps must be >= 0"),
        ({"dataset": TINY, "algo": "bc", "seed": -1}, [], "seed must be >= 0, got -1"),
        ({"dataset": TINY, "algo": "bc"}, ["online_ratio=1.5"], "online_ratio must be in [0, 1]"),
        ({"dataset": TINY, "algo": "bc"}, ["top_fraction=abc"], "'top_fraction' expects float"),
        ({"dataset": TINY, "algo": "bc", "precision": "fp16"}, [], "precision 'fp16' is not one of float32, bf16"),
        # learner settings out of range fail here, before any data is loaded, naming a value that works
        ({"dataset": TINY, "algo": "td3bc"}, ["alpha=-1"], "alpha must be in [0, inf), got -1.0; e.g. --set alpha=2.5"),
        ({"dataset": TINY, "algo": "iql"}, ["expectile=1.5"], "expectile must be in (0, 1), got 1.5"),
        ({"dataset": TINY, "algo": "prdc"}, ["tau=0"], "tau must be in (0, 1], got 0.0"),
        ({"dataset": TINY, "algo": "prdc"}, ["ivf_probe=0"], "ivf_probe must be in [1, inf), got 0"),
        ({"dataset": TINY, "algo": "prdc"}, ["hidden=256,0"], "hidden must list positive layer widths, got [256, 0]"),
        ({"dataset": TINY, "algo": "bc"}, ["top_fraction=0"], "top_fraction must be in (0, 1], got 0.0"),
        ({"dataset": TINY, "algo": "bc"}, ["lr=nan"], "lr must be in (0, inf), got nan"),
    ]
    for flags, sets, message in cases:
        with pytest.raises(ConfigError) as err:
            resolve_run(None, flags, sets)
        assert message in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "typo.yaml").write_text("dataset: hopper-medium\nalgo: bc\nstep: 10\n")
    with pytest.raises(ConfigError, match="unknown key 'step'; did you mean 'steps'"):
        resolve_run(tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        resolve_run(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        resolve_run(tmp_path / "list.yaml")
    resumed = CliRunner().invoke(app, ["fit", "--resume", "abc", "--steps", "5"])
    assert resumed.exit_code != 0 and "drop --steps" in str(resumed.exception)


def test_run_config_precedence_and_typing(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "dataset: halfcheetah-medium\nalgo: prdc\nsteps: 1e5\nalgo_settings:\n  beta: 3\n  hidden: [64, 64]\n")
    run, cls = resolve_run(tmp_path / "run.yaml", {"seed": 2}, ["beta=4", "batch_size=128"])
    assert run.steps == 100_000 and run.seed == 2 and run.batch_size == 128
    assert run.algo_settings["alpha"] == 40.0  # the paper's halfcheetah override
    assert run.algo_settings["beta"] == 4.0 and run.algo_settings["hidden"] == [64, 64]
    assert run.algo_settings["seed"] == 2
    defaults, _ = resolve_run(None, {"dataset": "hopper-medium", "algo": "prdc"})
    assert defaults.algo_settings["alpha"] == 2.5 and isinstance(defaults, RunConfig)


def test_algos_lists_learners_settings_and_paper_overrides():
    listed = run_cli("algos", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert {"bc", "td3bc", "prdc"} <= set(rows)
    bc = {s["name"]: s for s in rows["bc"]["settings"]}
    assert bc["lr"]["default"] == 3e-4 and bc["lr"]["type"] == "float" and bc["lr"]["doc"]
    assert bc["top_fraction"]["default"] == 1.0 and bc["hidden"]["default"] == [256, 256]
    assert bc["top_fraction"]["range"] == "(0, 1]" and bc["stochastic"]["range"] == ""
    iql = {s["name"]: s for s in rows["iql"]["settings"]}
    assert iql["expectile"]["range"] == "(0, 1)" and iql["gamma"]["range"] == "[0, 1]"
    assert rows["prdc"]["overrides"].get("halfcheetah-*", {}).get("alpha") == 40.0
    text = CliRunner().invoke(app, ["algos"])
    assert text.exit_code == 0 and "top_fraction" in text.stdout


def test_ui_runs_mlflow_ui_on_the_local_store(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    shown = run_cli("ui", "--port", "5055", "--dry-run", env=env)
    assert shown.returncode == 0, shown.stderr
    cmd = shown.stdout.split()
    assert cmd[1:4] == ["-m", "mlflow", "ui"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert cmd[cmd.index("--port") + 1] == "5055"
    assert cmd[cmd.index("--default-artifact-root") + 1] == (tmp_path / "mlflow" / "artifacts").as_uri()
