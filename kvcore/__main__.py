"""``python -m kvcore`` is the ``kvcore`` command (see :mod:`kvcore.cli`)."""

from kvcore.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
