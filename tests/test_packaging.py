"""The package is complete outside a checkout, and the container image installs the same one.

The wheel test builds the wheel from a copy of the checkout (`pip wheel`, as `pip install .` does), installs it
`--no-deps` into a fresh virtual environment, and runs every console script's `--help` and the tiny demo
(`openvision-demo`, `python -m recaption.tiny DIR`, `python -m train.mllm.tiny DIR`, `python -m scoring.tiny
DIR`) from a temporary folder with no PYTHONPATH. The environment sees the project's dependencies through a
`.pth` line naming the test environment's site-packages as a plain path: Python adds that folder to sys.path
without processing the `.pth` files inside it, so the checkout's editable install (an import hook installed
by such a file) stays out. Installing every dependency afresh would take minutes and prove nothing more about
the wheel. Each process checks where the project's packages come from.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import pytest
import setuptools
import tomllib
from test_infra import dockerfile_instructions

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
BUILD_LEFTOVERS = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "demo_out",
                                         "bench_out", ".pytest_cache")


def checkout_packages() -> set[str]:
    """Every package in the checkout (a folder of folders with __init__.py from the root down), by dotted name."""
    names = set()
    for init in ROOT.rglob("__init__.py"):
        parts = init.parent.relative_to(ROOT).parts
        if parts and all((ROOT.joinpath(*parts[:i + 1]) / "__init__.py").exists() for i in range(len(parts))):
            names.add(".".join(parts))
    return names


PACKAGES = sorted(checkout_packages() - {"benchmarks"})   # what the wheel and the image must hold


def test_package_discovery_is_automatic_and_ships_every_package_but_the_benchmarks():
    packages = PYPROJECT["tool"]["setuptools"].get("packages")
    assert isinstance(packages, dict) and "find" in packages, f"a hand-kept package list in pyproject.toml: {packages}"
    found = setuptools.find_packages(where=str(ROOT), include=packages["find"].get("include", ("*",)),
                                     exclude=packages["find"].get("exclude", ()))
    assert sorted(found) == PACKAGES
    assert {"dataset.synthetic", "train.mllm", "scoring"} <= set(found)
    for target in SCRIPTS.values():   # 'pipelines.demo:main': its module is one of the packages' modules
        module = target.split(":")[0]
        assert module.rpartition(".")[0] in found and (ROOT / (module.replace(".", "/") + ".py")).exists(), target


def test_every_entry_point_in_pipelines_is_a_console_script():
    """A new command in pipelines/ cannot ship without its `openvision-NAME` script (the README promises one each)."""
    commands = {path.stem for path in (ROOT / "pipelines").glob("*.py") if "\ndef main(" in path.read_text()}
    assert {f"openvision-{name}": f"pipelines.{name}:main" for name in commands} == SCRIPTS


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / "infra" / "Dockerfile.dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_the_image_installs_the_whole_package_non_editable():
    """infra/Dockerfile copies the build context and `pip install`s it (not -e), the context keeps every
    package folder, and the image imports every top-level package the installed distribution lists."""
    instructions = dockerfile_instructions(ROOT / "infra" / "Dockerfile")
    copies = [args.split() for keyword, args in instructions if keyword == "COPY"]
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    assert [".", "."] in copies, "the image must copy the whole build context (its .dockerignore says what not)"
    whole = copies.index([".", "."])
    install = [run for run in runs if "pip install" in run and " ." in run.split("&&")[0] + " "]
    assert install, "no `pip install ... .` of the project"
    assert "-e" not in install[0].split("&&")[0].split(), "the image must install the package, not an editable link"
    position = [args for keyword, args in instructions if keyword in ("COPY", "RUN")]
    assert position.index(install[0]) > position.index(" ".join(copies[whole])), "install after copying the code"
    top_level = {name.split(".")[0] for name in PACKAGES}
    for pattern in dockerignore_patterns():
        for package in top_level:
            assert not fnmatch(package, pattern.rstrip("/")) and not fnmatch(package, pattern.removeprefix("**/")), \
                f"infra/Dockerfile.dockerignore excludes the package folder {package}/ ({pattern!r})"
    check = [run for run in runs if "top_level.txt" in run]
    assert check and "import_module" in check[0] and "openvision-data-engine" in check[0], \
        "the image must import every top-level package of the installed distribution"
    assert runs.index(check[0]) >= runs.index(install[0])


def test_no_secret_enters_the_image_or_the_runtime_env():
    """Ray's auth token lives in ~/.ray/auth_token or a secret; a copy in the checkout must not ship."""
    assert {"auth_token", "**/auth_token", ".ray"} <= set(dockerignore_patterns())
    import yaml

    excludes = yaml.safe_load((ROOT / "infra" / "runtime_env.yaml").read_text())["excludes"]
    assert {"auth_token", ".ray/"} <= set(excludes)


# ----- the wheel in a fresh environment

@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` would install, built from a copy (setuptools writes build/ beside the sources)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=BUILD_LEFTOVERS)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp / "dist"), str(source)], cwd=tmp)
    (built,) = (tmp / "dist").glob("*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (--no-deps); the dependencies come from this environment's
    site-packages, named by a .pth line (not processed as a site folder: no editable hook)."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    site = Path(run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]))
    (site / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index",
         "-q", str(wheel)])
    return venv


def run(argv: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> str:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-4000:]}\n"
                                    f"{result.stderr[-4000:]}")
    return result.stdout.strip()


def outside_env(venv: Path) -> dict:
    """The venv first on PATH, no PYTHONPATH: nothing points at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", VLLM_CPU_KVCACHE_SPACE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def test_the_wheel_holds_every_module_of_the_checkout(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES:
        folder = ROOT / package.replace(".", "/")
        for module in folder.glob("*.py"):
            assert module.relative_to(ROOT).as_posix() in names, f"{module.relative_to(ROOT)} is not in the wheel"
    assert not any(name.startswith(("benchmarks/", "tests/")) for name in names)


# Runs every console script as its generated wrapper does (sys.argv, then the entry point's main()), all in one
# process: the imports they share are paid once. Prints {script: (exit code, output)} and where the packages
# came from, as JSON.
CALL_SCRIPTS = """
import contextlib, io, json, sys
from importlib.metadata import distribution
scripts = {ep.name: ep for ep in distribution("openvision-data-engine").entry_points if ep.group == "console_scripts"}
answers = {}
for name, ep in sorted(scripts.items()):
    sys.argv = [name, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = ep.load()()
    except SystemExit as e:
        code = e.code
    answers[name] = [code or 0, out.getvalue()]
import dataset, pipelines, recaption, scoring, train
files = [m.__file__ for m in (dataset, pipelines, recaption, scoring, train)]
print(json.dumps({"answers": answers, "files": files, "path": sys.path}))
"""


@pytest.mark.slow
def test_console_scripts_and_tiny_models_run_from_the_wheel_outside_the_checkout(installed, tmp_path):
    env, python = outside_env(installed), str(installed / "bin" / "python")
    assert all((installed / "bin" / script).exists() for script in SCRIPTS)
    report = json.loads(run([python, "-c", CALL_SCRIPTS], cwd=tmp_path, env=env).splitlines()[-1])
    assert sorted(report["answers"]) == sorted(SCRIPTS)
    for script, (code, text) in report["answers"].items():
        assert code == 0 and text.startswith("usage:") and script in text.splitlines()[0], (script, text[-2000:])
    assert all(path.startswith(str(installed)) for path in report["files"]), report["files"]
    assert str(ROOT) not in report["path"], report["path"]   # "" is the temporary cwd

    for module, made in (("recaption.tiny", "config.json"), ("train.mllm.tiny", "tower.pt"),
                         ("scoring.tiny", "open_clip_config.json")):
        out = tmp_path / module
        run([python, "-m", module, str(out)], cwd=tmp_path, env=env)
        assert (out / made).exists(), f"python -m {module} wrote no {made}"


@pytest.mark.slow
def test_tiny_demo_runs_from_the_wheel_outside_the_checkout(installed, tmp_path):
    demo = tmp_path / "demo"
    text = run([str(installed / "bin" / "openvision-demo"), "--out", str(demo), "--images", "12"], cwd=tmp_path,
               env=outside_env(installed))
    assert "outputs:" in text and (demo / "report.html").exists() and (demo / "published" / "README.md").exists()
