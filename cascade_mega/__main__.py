import sys

from cascade_mega.cli import main

if __name__ == "__main__":  # dist_checkpointing helpers re-import __main__: keep this guard
    sys.exit(main())
