"""States shared by every engine's results, and the record helper. No I/O."""

from __future__ import annotations

import dataclasses
from enum import StrEnum
from typing import Any

__all__ = ["ConnectState", "to_record"]


class ConnectState(StrEnum):
    """What one connection attempt ended in, as the socket core sees it.

    Commands rename these for their users (port-check says "closed" for REFUSED and
    "filtered" for TIMEOUT, as nmap does), but the classification is made once, here.
    """

    OPEN = "open"  # handshake completed
    REFUSED = "refused"  # RST in answer to the SYN (ECONNREFUSED)
    TIMEOUT = "timeout"  # no answer before the deadline (ours, or the kernel's ETIMEDOUT)
    UNREACHABLE = "unreachable"  # EHOSTUNREACH, ENETUNREACH, admin-prohibited, ...
    RESET = "reset"  # ECONNRESET: accepted, then aborted by the peer
    ERROR = "error"  # anything else, with its errno name (EADDRNOTAVAIL, EMFILE, ...)
    RESOLVE = "resolve"  # the name did not resolve (EAI_* errno name)


def to_record(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a result dataclass (enums become their values)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        raw = dataclasses.asdict(obj)
    elif isinstance(obj, dict):
        raw = dict(obj)
    else:
        raise TypeError(f"not a result: {obj!r}")
    return {key: _plain(value) for key, value in raw.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
