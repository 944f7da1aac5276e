"""Puts the repository root on sys.path, so `python scripts/NAME.py` imports model/ and dataset/ without installing them.

Every script's first import; Python puts only the script's own folder (scripts/) on the path.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
