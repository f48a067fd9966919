"""The wheel installs the folders under `budgetflow.*` and never as a top-level `tokenizers`."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        timeout=300,
    )
    (path,) = out.glob("budgetflow-*.whl")
    return path


def test_wheel_maps_the_folders_under_the_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names if not name.startswith("budgetflow-")}
    assert tops == {"budgetflow"}
    for package in ("streams", "schemas", "tokenizers"):
        assert f"budgetflow/{package}/__init__.py" in names
        assert f"budgetflow/{package}/py.typed" in names
    assert "budgetflow/streams/dev/kafka-local/pom.xml" in names


def test_installed_wheel_imports_without_shadowing_tokenizers(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Unpack the wheel as pip would, and make the dev venv's dependencies (not
    # its editable budgetflow: .pth lines add paths, they do not run finders)
    # visible behind it.
    zipfile.ZipFile(wheel).extractall(site)
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = (
        "import importlib.util, sys\n"
        "import budgetflow.tokenizers, budgetflow.schemas, budgetflow.streams.cli\n"
        f"assert budgetflow.tokenizers.__file__.startswith({site!r}), budgetflow.tokenizers.__file__\n"
        "spec = importlib.util.find_spec('tokenizers')\n"
        "assert spec is None or 'budgetflow' not in (spec.origin or ''), spec\n"
        "print('ok')\n"
    )
    proc = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
