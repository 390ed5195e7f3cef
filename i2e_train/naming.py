"""Errors for unknown names (configs, models, released weights) with the closest known names."""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["closest", "unknown_name"]


def closest(name: str, known: Iterable[str], n: int = 3, cutoff: float = 0.5) -> list[str]:
    """The known names that look most like ``name`` (best first)."""
    return difflib.get_close_matches(name, list(known), n=n, cutoff=cutoff)


def unknown_name(what: str, name: str, known: Iterable[str], key: str | None = None, listed: str = "Known",
                 error: type[Exception] = ValueError) -> Exception:
    """``error("unknown <what> 'name'. Did you mean ...? <listed>: ...")``; ``key`` is the form of
    the name that is compared (e.g. without a prefix), ``name`` the one shown."""
    known = list(known)
    close = closest(name if key is None else key, known)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return error(f"unknown {what} {name!r}.{hint} {listed}: {', '.join(known)}")
