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
        "verify": [missing],
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


def test_a_mistyped_clip_model_is_one_line_before_any_worker_starts(tmp_path, capsys):
    from dataset.synthetic import finished_runs
    from pipelines import score

    out = str(tmp_path / "out")
    finished_runs.write_recaption_outputs(out, 1, 4, image_size=16)
    for flags, says in ((["--clip-model", "ViT-l-14"], "not an open_clip architecture (did you mean ViT-L-14?)"),
                        (["--clip-model", "ViT-L-14", "--pretrained", "datacomp"], "ViT-L-14 has openai, "),
                        (["--clip-model", f"local-dir:{tmp_path}"], "no open_clip_config.json")):
        with pytest.raises(SystemExit) as ended:
            score.main(["--input", out, *flags])
        err = capsys.readouterr().err
        assert ended.value.code == 2 and err.count("\n") == 1 and says in err, err


def test_a_claim_ttl_too_short_for_remote_storage_is_refused(capsys):
    from pipelines import recaption

    with pytest.raises(SystemExit) as ended:
        recaption.main(["--input", "s3://bucket/in", "--output", "s3://bucket/out", "--model", str(ROOT),
                        "--backend", "null", "--claim-ttl", "2"])
    assert ended.value.code == 2
