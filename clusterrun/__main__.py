"""The `clusterrun` command (and `python -m clusterrun`)."""

import gc


def run() -> None:
    # Start-up allocates a great deal and frees almost nothing: no collector
    # passes until the command runs (cli._run freezes what is there, then
    # enables the collector again).
    gc.disable()
    from .cli import main

    main()


if __name__ == "__main__":
    run()
