"""The small photo sample shipped inside the package: ``--data-dir sample`` in every command.

    python -m tune_pets.pipeline --smoke                  # uses it by default
    python -m tune_pets.train cnn --data-dir sample       # any command, by name

296 downscaled Oxford-IIIT Pet photos (37 breeds, 5 train + 3 test each, CC BY-SA 4.0; see
``sample_data/README.md``), made by ``scripts/make_sample.py``. Only the standard library is
imported here, so the CLI edge can resolve ``--data-dir`` cheaply.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SAMPLE_NAME = "sample"  # the --data-dir value that selects the shipped sample


def sample_dir() -> Path:
    """The installed sample folder, found through ``importlib.resources`` (editable or wheel
    install); ``FileNotFoundError`` when the package lacks its data files or is zipped."""
    folder = resources.files("tune_pets") / "sample_data"
    if not isinstance(folder, Path) or not (folder / "train").is_dir():
        raise FileNotFoundError(
            f"the shipped data sample is missing: {folder} has no train/ folder; reinstall "
            "tune_pets with its package data, or pass --data-dir PATH to an ImageFolder copy"
        )
    return folder


def resolve_data_dir(value: str | Path) -> Path:
    """The sample for the exact string ``"sample"``; any other value (``./sample`` too) as a
    Path, so a real folder named ``sample`` stays reachable."""
    return sample_dir() if value == SAMPLE_NAME else Path(value)
