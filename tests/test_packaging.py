"""uptrain installed from its wheel (not the source tree): every command's help, the demo's entry point and data,
the shipped run configs."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests import ROOT
from uptrain_gqa.cli import COMMANDS

PIP = [sys.executable, "-m", "pip"]

pytestmark = pytest.mark.integration  # builds, installs and runs the wheel in fresh processes


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from this tree."""
    work = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools' build/ folder in the tree would keep files that were deleted since
    source = work / "source"
    shutil.copytree(ROOT / "uptrain_gqa", source / "uptrain_gqa", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    build = [*PIP, "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(work)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (built,) = work.glob("uptrain_gqa-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict[str, str]:
    """The wheel installed without dependencies into a folder of its own; an environment whose `python`
    imports uptrain_gqa from there (the dependencies come from this venv)."""
    site = tmp_path_factory.mktemp("site")
    install = [*PIP, "install", str(wheel), "--no-deps", "-q", "--target", str(site)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    return {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PYTHONSAFEPATH": "1"}


def run(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_the_installed_package_is_the_wheel(installed, tmp_path) -> None:
    proc = run(installed, "-c", "import uptrain_gqa; print(uptrain_gqa.__file__)", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(installed["PYTHONPATH"]), proc.stdout
    script = Path(installed["PYTHONPATH"]) / "bin" / "uptrain"  # the console script the wheel declares
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, env=installed, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("uptrain "), proc.stderr


def test_every_command_has_help(installed, tmp_path) -> None:
    """Every subcommand's --help from the installed package (one process for all: each start costs ~1.5 s)."""
    code = (
        "import contextlib, io\n"
        "from uptrain_gqa.cli import main\n"
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


@pytest.mark.slow  # an import of the installed package (~4 s); the demo itself runs in test_demo.py
def test_the_demo_runs_from_the_installed_package(installed, tmp_path) -> None:
    proc = run(installed, "-m", "uptrain_gqa.demo", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "python -m uptrain_gqa.demo" in proc.stdout
    code = (
        "from uptrain_gqa.demo.pipeline import CONFIGS, Pipeline\n"
        "p = Pipeline(out=None)\n"
        "print(CONFIGS)\n"
        "for f in (p.pretrain, p.uptrain, p.architecture): assert f.is_file() and f.read_text(), f\n"
    )
    proc = run(installed, "-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(installed["PYTHONPATH"])  # package data, not the repo's files


def test_the_run_configs_ship_in_the_wheel(wheel, installed, tmp_path) -> None:
    """configs/ (the run configs and accelerate's) is package data: found by name from the installed package."""
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"uptrain_gqa/configs/llama2-7b-gqa8.yaml", "uptrain_gqa/configs/accelerate/fsdp2.yaml"} <= names
    code = (
        "from uptrain_gqa.training.config import SHIPPED_CONFIGS, shipped_config\n"
        "for name in SHIPPED_CONFIGS: assert shipped_config(name).is_file(), name\n"
        "print(shipped_config('llama2-7b-gqa8'), *SHIPPED_CONFIGS)\n"
    )
    proc = run(installed, "-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    path, *shipped = proc.stdout.split()
    assert path.startswith(installed["PYTHONPATH"])  # package data, not the repo's files
    assert "tiny-cpu" in shipped and "llama2-7b-gqa8" in shipped


def test_the_distribution_has_a_name_of_its_own(installed) -> None:
    """`uptrain` on PyPI is another project: the distribution is uptrain-gqa, typed, with its extras."""
    from email.parser import Parser

    site = Path(installed["PYTHONPATH"])
    (info,) = site.glob("uptrain_gqa-*.dist-info")
    meta = Parser().parsestr((info / "METADATA").read_text())
    assert meta["Name"] == "uptrain-gqa"
    assert {"eval", "plot"} <= set(meta.get_all("Provides-Extra"))
    assert (site / "uptrain_gqa" / "py.typed").is_file()
    assert not list(site.glob("uptrain-*.dist-info")), "never the unrelated `uptrain` distribution"


@pytest.mark.slow  # fetches PyPI's uptrain 0.7.1 and installs both (~5 s); make test-all
def test_the_wheel_installs_beside_pypis_uptrain(wheel, tmp_path) -> None:
    """PyPI's `uptrain` (an unrelated project, 0.7.1) installs a top-level `uptrain` package: in one virtual
    environment the two share no file, both import from their own files and uptrain's command runs."""
    other = tmp_path / "other"  # its wheel and the one package its lazy `import uptrain` needs, from the registry
    fetch = [*PIP, "download", "--no-deps", "-q", "-d", str(other), "uptrain==0.7.1", "lazy_loader"]
    subprocess.run(fetch, check=True, capture_output=True, timeout=300)
    (theirs,) = other.glob("uptrain-0.7.1-*.whl")
    outer = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())  # fmt: skip
    (site / "dependencies.pth").write_text(f"{outer}\n")  # torch, transformers, ... from this venv
    for whl in [*other.glob("lazy_loader-*.whl"), theirs, wheel]:  # theirs first: ours must not replace it
        install = [*PIP, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(whl)]
        subprocess.run(install, check=True, capture_output=True, timeout=300)
    check = (
        "import uptrain, uptrain_gqa, importlib.metadata as m\n"
        "assert uptrain.__file__.startswith(str(m.distribution('uptrain').locate_file('uptrain')))\n"
        "print(m.version('uptrain'), uptrain_gqa.__version__, uptrain_gqa.__file__)\n"
    )
    proc = subprocess.run([python, "-c", check], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    theirs_version, ours, where = proc.stdout.split()
    assert theirs_version == "0.7.1" and where.startswith(str(site / "uptrain_gqa"))
    # every file of both distributions is still the one its RECORD lists
    files = {}
    for dist in ("uptrain", "uptrain_gqa"):
        record = next(site.glob(f"{dist}-*.dist-info")) / "RECORD"
        files[dist] = {line.rsplit(",", 2)[0] for line in record.read_text().splitlines()}
        for line in record.read_text().splitlines():
            path, digest, _ = line.rsplit(",", 2)
            if digest and path.startswith(f"{dist}/"):
                algo, value = digest.split("=", 1)
                data = hashlib.new(algo, (site / path).read_bytes()).digest()
                assert base64.urlsafe_b64encode(data).rstrip(b"=").decode() == value, (dist, path)
    assert not files["uptrain"] & files["uptrain_gqa"]
    proc = subprocess.run([venv / "bin" / "uptrain", "--version"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == f"uptrain {ours}", proc
