"""Multi-rank tests: real gloo ranks in spawned processes (see rank_cases.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "transforms"))
