"""The per-machine cache folder: what one machine computes once and every workspace reuses (MLflow's
empty store, converted base models). TUNEFACTORY_CACHE moves it; otherwise it is
$XDG_CACHE_HOME/tunefactory, else ~/.cache/tunefactory. Deleting it loses nothing but time."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache() -> Path:
    if os.environ.get("TUNEFACTORY_CACHE"):
        return Path(os.environ["TUNEFACTORY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunefactory"
