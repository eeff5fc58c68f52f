"""A user's mistake (a missing folder, a missing flag) ends every command with one line naming it and exit
status 2, not a traceback; OPENVISION_TRACEBACK=1 brings the traceback back."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def commands(missing: str, out: str) -> dict[str, list[str]]:
    """Each entry point, given a path that does not exist where it needs one."""
    return {
        "publish": ["--input", missing, "--dest", out],
        "report": ["--input", missing, "--out", f"{out}/report.html"],
        "score": ["--input", missing, "--clip-model", "local-dir:" + out],
        "export": ["--checkpoint", missing, "--out", out],
        "evaluate": ["--checkpoint", missing, "--zeroshot", out],
        "download": ["--url-list", missing, "--output", out],
        "train": ["--data", missing, "--out", out, "--build-tokenizer"],
    }


@pytest.mark.parametrize("name", sorted(commands("", "")))
def test_a_missing_path_is_one_line_naming_it(name, tmp_path, capsys):
    missing = str(tmp_path / "no-such-folder")
    main = importlib.import_module(f"pipelines.{name}").main
    with pytest.raises(SystemExit) as ended:
        main(commands(missing, str(tmp_path / "out"))[name])
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"[{name}] error: ") and err.count("\n") == 1, err
    assert "no-such-folder" in err and "Traceback" not in err


def test_training_without_a_tokenizer_says_which_flag(tmp_path, capsys):
    from pipelines import train

    with pytest.raises(SystemExit):
        train.main(["--data", str(ROOT / "tests"), "--out", str(tmp_path / "run")])
    assert "give --tokenizer DIR" in capsys.readouterr().err


def test_a_script_run_prints_no_traceback_unless_asked(tmp_path):
    command = [sys.executable, "pipelines/publish.py", "--input", str(tmp_path / "none"), "--dest", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "OPENVISION_TRACEBACK"}
    quiet = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2 and quiet.stderr.startswith("[publish] error: ") and "Traceback" not in quiet.stderr
    loud = subprocess.run(command, cwd=ROOT, env={**env, "OPENVISION_TRACEBACK": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "FileNotFoundError" in loud.stderr
