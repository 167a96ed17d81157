"""``python -m fuselm`` runs the CLI."""

from fuselm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
