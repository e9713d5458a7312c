"""Private files: what pulse keeps (the database, its journal, the operator token, backups) is its owner's alone."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DATA_DIR_MODE = 0o700
FILE_MODE = 0o600


def make_private(path: Path, mode: int = FILE_MODE) -> None:
    """Give `path` this mode if it exists with another (made by hand, or by an older pulse); a warning if it
    cannot (someone else owns it)."""
    try:
        if stat.S_IMODE(path.stat().st_mode) != mode:
            os.chmod(path, mode)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot make %s private (mode %o): %s", path, mode, exc.strerror)
