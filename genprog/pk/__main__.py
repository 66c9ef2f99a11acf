"""``python -m genprog.pk``: the command line of :mod:`genprog.pk.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
