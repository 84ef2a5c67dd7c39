"""``python -m bids_siamfuse`` runs the BIDS App."""

from .cli.run import main

if __name__ == "__main__":
    raise SystemExit(main())
