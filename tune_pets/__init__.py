"""tune_pets: Ray Tune hyperparameter search for Oxford-IIIT Pet classification.

Data flows one way: prepare -> dataset cache -> [feature cache] -> fit <- search
-> reproduce -> evaluate -> profile -> report. Only ``tune_pets.search`` imports Ray.
"""

import sys

__version__ = "0.1.0"


def _interrupted_while_starting(kind, value, traceback, _default=sys.excepthook) -> None:
    """A Ctrl-C while a command imports torch (its first seconds, before ``cli_main`` runs):
    one line and exit 130, like a Ctrl-C later on, instead of a traceback into torch."""
    if not issubclass(kind, KeyboardInterrupt):
        return _default(kind, value, traceback)
    args = sys.orig_argv
    module = args[args.index("-m") + 1] if "-m" in args[:-1] else "tune_pets"
    print(f"\npython -m {module}: interrupted while starting; nothing was written", file=sys.stderr)


# Only for ``python -m tune_pets...`` (argv[0] is "-m" while the package is imported), never in
# a program that imports tune_pets.
if sys.argv[:1] == ["-m"]:
    sys.excepthook = _interrupted_while_starting
    # torch's C extension imports numpy and takes any error there, KeyboardInterrupt included,
    # for "numpy not installed": a Ctrl-C in that window (measured: 2 of 30 tries on a busy
    # machine) was lost, and the command ran on with a torch unable to use numpy. numpy imported
    # first, a Ctrl-C there is an ordinary KeyboardInterrupt.
    import numpy  # noqa: F401
