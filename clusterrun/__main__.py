"""The `clusterrun` command (and `python -m clusterrun`)."""

from . import compat


def run() -> None:
    compat.gc_off()         # until the command runs (cli._run): see compat.py
    from .cli import main

    main()


if __name__ == "__main__":
    run()
