"""``python -m tune_pets``: list the commands; ``python -m tune_pets COMMAND ...`` runs one."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prepare": "download the dataset (or convert a local copy) into an ImageFolder",
    "sanity": "class counts, image sizes, odd files and image grids of a data dir",
    "train": "train one model once (exploratory run, its own output folder)",
    "evaluate": "score a checkpoint on a split",
    "profiling": "torch.profiler over a model's train step",
    "search": "hyperparameter search: Ray Tune + Optuna TPE + ASHA",
    "reproduce": "retrain the best (or baseline) config deterministically, test once, profile",
    "report": "write REPORT.md from the artifacts",
    "pipeline": "the whole study: sanity, search, reproduce, report",
}


def main(argv: list[str]) -> int:
    debug = argv[:1] == ["--debug"]  # python -m tune_pets --debug COMMAND ...
    argv = argv[debug:]
    if argv and argv[0] in COMMANDS:
        from tune_pets.utils import cli_main

        module = importlib.import_module(f"tune_pets.{argv[0]}")
        rest = [*argv[1:], "--debug"] if debug else argv[1:]
        cli_main(module.main, rest, prog=f"python -m tune_pets {argv[0]}")  # exits
    print("usage: python -m tune_pets COMMAND [options]   (or python -m tune_pets.COMMAND)")
    print("\ncommands:")
    for name, text in COMMANDS.items():
        print(f"  {name:<{max(map(len, COMMANDS))}}  {text}")
    print("\nEach command takes --help.")
    if argv and argv[0] not in ("-h", "--help"):
        print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
