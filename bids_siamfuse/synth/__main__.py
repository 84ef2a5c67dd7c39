"""``python -m bids_siamfuse.synth``."""

from .cli import main

raise SystemExit(main())
