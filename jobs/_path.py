"""Lets `python jobs/<name>.py` import the engine from a plain checkout (no install needed)."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
