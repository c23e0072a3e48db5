"""uptrain installed from its wheel (not the source tree): every command's help, the demo's entry point and data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ROOT
from uptrain.cli import COMMANDS


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """The wheel built from this tree, installed without dependencies into a folder of its own; an
    environment whose `python` imports uptrain from there (the dependencies come from this venv)."""
    work = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools' build/ folder in the tree would keep files that were deleted since
    source = work / "source"
    shutil.copytree(ROOT / "uptrain", source / "uptrain", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip"]
    build = [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(work)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = work.glob("uptrain_gqa-*.whl")
    site = work / "site"
    install = [*pip, "install", str(wheel), "--no-deps", "-q", "--target", str(site)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    return {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PYTHONSAFEPATH": "1"}


def run(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_the_installed_package_is_the_wheel(installed, tmp_path) -> None:
    proc = run(installed, "-c", "import uptrain; print(uptrain.__file__)", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(installed["PYTHONPATH"]), proc.stdout


def test_every_command_has_help(installed, tmp_path) -> None:
    """Every subcommand's --help from the installed package (one process for all: each start costs ~1.5 s)."""
    code = (
        "import contextlib, io\n"
        "from uptrain.cli import main\n"
        f"for command in {list(COMMANDS)!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            main([command, '--help'])\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, (command, e.code)\n"
        "    assert out.getvalue().startswith(f'usage: uptrain {command}'), (command, out.getvalue()[:200])\n"
        "    print(command)\n"
    )
    proc = run(installed, "-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == list(COMMANDS)


def test_the_demo_runs_from_the_installed_package(installed, tmp_path) -> None:
    proc = run(installed, "-m", "uptrain.demo", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "python -m uptrain.demo" in proc.stdout
    code = (
        "from uptrain.demo.pipeline import CONFIGS, Pipeline\n"
        "p = Pipeline(out=None)\n"
        "print(CONFIGS)\n"
        "for f in (p.pretrain, p.uptrain, p.architecture): assert f.is_file() and f.read_text(), f\n"
    )
    proc = run(installed, "-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(installed["PYTHONPATH"])  # package data, not the repo's files


def test_the_distribution_has_a_name_of_its_own(installed) -> None:
    """`uptrain` on PyPI is another project: the distribution is uptrain-gqa, typed, with its extras."""
    from email.parser import Parser

    site = Path(installed["PYTHONPATH"])
    (info,) = site.glob("uptrain_gqa-*.dist-info")
    meta = Parser().parsestr((info / "METADATA").read_text())
    assert meta["Name"] == "uptrain-gqa"
    assert {"eval", "plot"} <= set(meta.get_all("Provides-Extra"))
    assert (site / "uptrain" / "py.typed").is_file()
    assert not list(site.glob("uptrain-*.dist-info")), "never the unrelated `uptrain` distribution"
