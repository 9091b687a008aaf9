"""keel.cli: argument handling, one-line errors and exit codes (in-process through keel.cli.main)."""

import pytest

from conftest import run_keel
from keel.cli import main
from keel.errors import EXIT_BAD_INPUT, KeelError

COMMANDS = ["train", "sft", "demo", "eval", "tiny-model", "monitor", "report", "sweep"]
BAD_KEY = "actor_rollout_ref.actor.entropy_coef=0.1"
BAD_KEY_LINE = ("keel: error: config key 'actor_rollout_ref.actor.entropy_coef' is unknown "
                "(did you mean 'entropy_coeff'?)")


def test_help_lists_every_command_and_exits_0(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: keel ")
    for name in COMMANDS:
        assert f"    {name} " in out, name  # each has its one-line help in the command list
    assert "--debug" in out


def test_subcommand_help_exits_0(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage: keel train [-h] [--nproc NPROC] config [overrides ...]")


def test_unknown_command_exits_2_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["frobnicate"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("keel: error: argument command: invalid choice: 'frobnicate' (choose from "
                                    "'train', 'sft', 'demo', 'eval', 'tiny-model', 'monitor', 'report', 'sweep')")


def test_unknown_option_exits_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "configs/demo.yaml", "--bogus"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "keel: error: unrecognized arguments: --bogus"


def test_train_without_config_exits_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train"])
    assert stop.value.code == 2
    assert "keel train: error: the following arguments are required: config" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "sft", "demo"])
def test_bad_config_key_is_one_error_line_and_exit_2(command, capsys):
    assert main([command, "configs/demo.yaml", BAD_KEY]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [BAD_KEY_LINE]  # one line, no traceback
    assert "Traceback" not in captured.out


def test_missing_config_file_exit_2(capsys):
    assert main(["train", "no/such/config.yaml"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.splitlines() == ["keel: error: config file 'no/such/config.yaml' does not exist"]


def test_eval_checks_its_options_before_loading_anything(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "absent"), "--k", "0"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.splitlines() == ["keel: error: --k must be >= 1, got 0"]
    assert main(["eval", str(tmp_path / "absent"), "--temperature", "-1"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.splitlines() == ["keel: error: --temperature must be >= 0 (0 = greedy), got -1.0"]


def test_overrides_after_options_are_still_overrides(tmp_path, capsys):
    # `keel eval DIR --k 2 key=value`: the dotted override after an option reaches the config (and is checked)
    assert main(["eval", str(tmp_path), "--k", "2", BAD_KEY]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.splitlines() == [BAD_KEY_LINE]


def test_debug_raises_instead_of_one_line(capsys):
    with pytest.raises(KeelError, match=r"config key 'actor_rollout_ref.actor.entropy_coef' is unknown"):
        main(["--debug", "train", "configs/demo.yaml", BAD_KEY])
    assert "keel: error:" not in capsys.readouterr().err


def test_debug_shows_a_traceback_from_the_real_cli():
    code, out, err = run_keel(["--debug", "train", "configs/demo.yaml", BAD_KEY], timeout=120)
    assert code == 1  # an uncaught exception
    assert err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1] == ("keel.errors.KeelError: config key 'actor_rollout_ref.actor.entropy_coef' "
                                    "is unknown (did you mean 'entropy_coeff'?)")
    code, out, err = run_keel(["train", "configs/demo.yaml", BAD_KEY], timeout=120)
    assert (code, err.splitlines()) == (2, [BAD_KEY_LINE])
