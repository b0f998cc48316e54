"""Which experiment trackers and ``train.tracker_kwargs`` keys a recipe may name: the schema the
recipe checks when it is loaded, apart from the engine that starts the trackers
(:mod:`selfdistill.engine.trackers`), so the recipe never imports the engine."""

from __future__ import annotations

from typing import Any

from selfdistill.configkit import check_kwargs_have_values, closest_hint, fail

__all__ = ["COMMON_KEYS", "check_tracker_kwargs", "check_trackers", "tracker_names"]

COMMON_KEYS = ("project", "name", "entity", "tags")


def tracker_names() -> list[str]:
    """Every tracker Accelerate starts by name (its registry, so a new Accelerate tracker or one
    registered with ``accelerate.tracking.register_tracker_class`` is accepted without a change here)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def check_trackers(key: str, trackers: list[str]) -> None:
    """Known names only. Accelerate's ``all`` is refused: it starts whatever happens to be installed,
    so the same recipe would log differently on two machines."""
    names = tracker_names()
    for tracker in trackers:
        if tracker == "all":
            fail(key, f"'all' starts whichever trackers are installed; name them (any of {', '.join(names)})")
        if tracker not in names:
            hint = closest_hint(tracker, names)
            hint = hint if hint.startswith(" (did you mean") else ""
            fail(key, f"unknown tracker {tracker!r}{hint}; Accelerate's trackers: {', '.join(names)}")
    if len(set(trackers)) != len(trackers):
        fail(key, f"a tracker is named twice in {trackers}")


def check_tracker_kwargs(key: str, kwargs: dict[str, Any]) -> None:
    """``project``/``name``/``entity`` strings, ``tags`` a list of strings, a tracker's name a mapping."""
    names = tracker_names()
    for k, v in kwargs.items():
        if k in ("project", "name", "entity"):
            if not isinstance(v, str) or not v:
                fail(f"{key}.{k}", f"expected a non-empty string, got {v!r}")
        elif k == "tags":
            if not isinstance(v, list) or not all(isinstance(t, str) and t for t in v):
                fail(f"{key}.tags", f"expected a list of non-empty strings, got {v!r}")
        elif k in names:
            if not isinstance(v, dict):
                fail(f"{key}.{k}", f"expected a mapping of {k}'s init keywords, got {v!r}")
            check_kwargs_have_values(f"{key}.{k}", v, example="mode: offline")
        else:
            fail(f"{key}.{k}", f"unknown key{closest_hint(str(k), [*COMMON_KEYS, *names])}")
