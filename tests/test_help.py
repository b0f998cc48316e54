"""Every entry point's ``--help`` prints and exits 0: argparse formats help texts with ``%``, so one
bare ``%`` in a protocol's help crashed ``run_eval.py --help`` with ``unsupported format character``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _eval_commands() -> list[str]:
    from selfdistill.eval.protocols import protocol_names

    return list(protocol_names())


def _entry_points() -> dict[str, object]:
    from selfdistill.cli import evaluate, plan, pretrain, shards

    return {"run_eval.py": evaluate.main, "run_pretrain.py": pretrain.main, "selfdistill-plan": plan.main,
            "selfdistill-shards": shards.main}


def _help_exits_0(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0, f"{argv}: exit {done.value.code}"
    out = capsys.readouterr().out
    assert out.startswith("usage:"), out[:200]
    return out


@pytest.mark.parametrize("name", ["run_eval.py", "run_pretrain.py", "selfdistill-plan", "selfdistill-shards"])
def test_entry_point_help(name, capsys):
    _help_exits_0(_entry_points()[name], ["--help"], capsys)


def test_every_run_eval_subcommand_help(capsys):
    from selfdistill.cli.evaluate import main

    commands = _eval_commands()
    assert {"knn", "linear", "export", "attention", "finetune", "summary"} <= set(commands)
    top = _help_exits_0(main, ["--help"], capsys)
    for command in commands:
        assert command in top
        _help_exits_0(main, [command, "--help"], capsys)


@pytest.mark.parametrize("command", [[], ["write"], ["verify"]])
def test_every_shards_subcommand_help(command, capsys):
    from selfdistill.cli.shards import main

    _help_exits_0(main, [*command, "--help"], capsys)


def test_run_eval_script_help_as_a_user_runs_it():
    done = subprocess.run([sys.executable, str(ROOT / "run_eval.py"), "--help"], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "attention" in done.stdout
