"""tune_pets: Ray Tune hyperparameter search for Oxford-IIIT Pet classification.

Data flows one way: prepare -> dataset cache -> [feature cache] -> fit <- search
-> reproduce -> evaluate -> profile -> report. Only ``tune_pets.search_ray`` imports Ray.
"""

import signal
import sys

__version__ = "0.1.0"

_stopped_at_start: list[int] = []
_AS_USUAL = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
# A command stopped by a signal: the word of its last line and its exit code.
STOPPED_BY = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}


def _note_stop(signum, frame) -> None:
    """The first Ctrl-C (or SIGTERM) while a command imports torch (its first seconds): noted,
    and the command stops as ``cli_main`` starts. Raised inside those imports, the
    KeyboardInterrupt was lost (torch's C extension imports numpy and takes any error there for
    "numpy not installed": the command ran on to exit 0, in 2 of 30 tries at 0-1.5 s on a busy
    machine) or aborted the process in pybind11 code. A second one acts at once."""
    _stopped_at_start.append(signum)
    signal.signal(signum, _AS_USUAL[signum])


def stop_if_interrupted_while_starting(prog: str) -> None:
    """Called as a command's ``main`` is about to run: Ctrl-C works as usual from here on, and
    one pressed during the imports ends the command with one line and exit 130 (SIGTERM: 143)."""
    for s, usual in _AS_USUAL.items():
        if signal.getsignal(s) is _note_stop:
            signal.signal(s, usual)
    if _stopped_at_start:
        how, code = STOPPED_BY[max(_stopped_at_start)]  # SIGTERM (15) over SIGINT (2)
        print(f"\n{prog}: {how} while starting; nothing was written", file=sys.stderr)
        sys.exit(code)


def _interrupted_while_starting(kind, value, traceback, _default=sys.excepthook) -> None:
    """A second Ctrl-C during a command's imports: one line, like the first, instead of a
    traceback into torch."""
    if not issubclass(kind, KeyboardInterrupt):
        return _default(kind, value, traceback)
    args = sys.orig_argv
    module = args[args.index("-m") + 1] if "-m" in args[:-1] else "tune_pets"
    print(f"\npython -m {module}: interrupted while starting; nothing was written", file=sys.stderr)


# Only for ``python -m tune_pets...`` (argv[0] is "-m" while the package is imported), never in
# a program that imports tune_pets; and not for a signal that is ignored (SIGINT of nohup or a
# background job).
if sys.argv[:1] == ["-m"]:
    for _s, _usual in _AS_USUAL.items():
        if signal.getsignal(_s) is _usual:
            signal.signal(_s, _note_stop)
    if signal.getsignal(signal.SIGINT) is _note_stop:
        sys.excepthook = _interrupted_while_starting
