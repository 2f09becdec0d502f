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
_PACKAGE = "tune_pets"
_FOLDER = "sample_data"


def sample_dir() -> Path:
    """The installed sample folder (``<site-packages>/tune_pets/sample_data`` or the checkout's).

    Found through ``importlib.resources``, so it works from an editable install and from a
    regular wheel install alike. Raises ``FileNotFoundError`` naming the place when the package
    was installed without its data files (or from a zip, where no folder exists on disk).
    """
    folder = resources.files(_PACKAGE) / _FOLDER
    if not isinstance(folder, Path) or not (folder / "train").is_dir():
        raise FileNotFoundError(
            f"the shipped data sample is missing: {folder} has no train/ folder; reinstall "
            "tune_pets with its package data, or pass --data-dir PATH to an ImageFolder copy"
        )
    return folder


def resolve_data_dir(value: str | Path) -> Path:
    """Map the literal ``"sample"`` to :func:`sample_dir`; return any other value as a Path.

    Only the exact string selects the sample (a ``Path("sample")`` or ``./sample`` stays a
    relative path), so a real folder named ``sample`` is still reachable as ``./sample``.
    """
    if isinstance(value, str) and value == SAMPLE_NAME:
        return sample_dir()
    return Path(value)
