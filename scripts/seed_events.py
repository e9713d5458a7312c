"""Send N days of realistic traffic to a pulse server through its HTTP API (see pulse/seed.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pulse.seed import main  # noqa: E402

if __name__ == "__main__":
    main()
