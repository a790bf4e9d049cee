"""``python -m gateway``: the same command line as the installed ``gateway`` script."""

from __future__ import annotations

from gateway.cli import main

if __name__ == "__main__":
    main()
