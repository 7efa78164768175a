from typing import Any

def run(
    epfd: int,
    conns: dict[int, Any],
    buffer: bytearray,
    max_events: int,
    now: float | None,
    lone_fd: int,
    /,
) -> list[tuple[int, int, Any]]: ...
