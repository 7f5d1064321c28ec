"""Ground truth for the audio-features stage, made here rather than annotated: songs rendered
from MMA accompaniment files (known tempo, meter, beats, downbeats and key), the EBU Tech 3341
and 3342 test signals built from their specifications, and speech mixed into music at known
ratios. Audio is rendered into a cache folder outside the clone, never committed."""

from __future__ import annotations

import os
from pathlib import Path

#: Where rendered audio is cached (``MOODSTREAM_GROUND_TRUTH_CACHE`` moves it).
CACHE = Path(os.environ.get("MOODSTREAM_GROUND_TRUTH_CACHE", Path.home() / ".cache" / "moodstream" / "ground-truth"))
