"""What a non-editable install gets: the wheel carries the search spaces and the photo sample,
and an installed copy finds its shipped YAMLs without the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import copy_checkout, has_checkout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a fresh copy of the checkout: pip builds in the source tree, so a
    build from the repository would write its build/ there and take stale files from it."""
    if not has_checkout():
        pytest.skip("needs a git checkout to copy")
    src = copy_checkout(tmp_path_factory.mktemp("checkout"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (whl,) = out.glob("tune_pets-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_carries_search_spaces_and_sample(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for yaml in ("cnn.yaml", "vit.yaml", "smoke/cnn.yaml", "smoke/vit.yaml"):
        assert f"tune_pets/search_spaces/{yaml}" in names
    assert "tune_pets/sample_data/README.md" in names
    assert sum(n.startswith("tune_pets/sample_data/train/") for n in names) >= 37 * 5


@pytest.mark.slow
def test_installed_copy_finds_its_shipped_files(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        "from tune_pets.spaces import default_space, load_search_spec;"
        "from tune_pets.sample import sample_dir;"
        "p = default_space('cnn'); load_search_spec(p); print(p); print(sample_dir())"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    spaces, sample = out.stdout.split()
    assert Path(spaces).is_relative_to(target) and Path(sample).is_relative_to(target)
