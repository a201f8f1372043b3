"""``python -m etf_hf`` is the ``etf-hf`` command (useful where the console script is not on PATH)."""
import sys

from .app.cli import main

sys.exit(main())
