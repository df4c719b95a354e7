"""``python -m lcodec``: the same command line as ``lcodec``."""

from .cli import main

if __name__ == "__main__":
    main()
