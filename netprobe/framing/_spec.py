"""Framing names as the CLI spells them (``--framing len32``) and what each one means. No I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from netprobe.errors import UsageError
from netprobe.framing._base import DEFAULT_MAX_FRAME, Decoder
from netprobe.framing._delimiter import DelimiterDecoder, encode_delimited
from netprobe.framing._length_prefix import LengthPrefixDecoder, encode_length_prefixed
from netprobe.framing._netstring import NetstringDecoder, encode_netstring
from netprobe.framing._raw import RawDecoder, encode_raw

__all__ = ["FRAMING_NAMES", "FramingSpec", "parse_framing"]

# name -> (decoder maker taking max_frame, encoder); the order is the one help texts show.
_CODECS: dict[str, tuple[Callable[[int], Decoder], Callable[[bytes], bytes]]] = {
    "raw": (RawDecoder, encode_raw),
    "line": (
        partial(DelimiterDecoder, b"\n"),
        partial(encode_delimited, delimiter=b"\n"),
    ),
    "crlf": (
        partial(DelimiterDecoder, b"\r\n"),
        partial(encode_delimited, delimiter=b"\r\n"),
    ),
    **{
        f"len{8 * width}": (
            partial(LengthPrefixDecoder, width),
            partial(encode_length_prefixed, width=width),
        )
        for width in (1, 2, 4, 8)
    },
    "netstring": (NetstringDecoder, encode_netstring),
}

FRAMING_NAMES: tuple[str, ...] = tuple(_CODECS)


@dataclass(frozen=True, slots=True)
class FramingSpec:
    """A named framing: makes decoders and encodes payloads.

    Attributes:
        name: one of FRAMING_NAMES (raw, line, crlf, len8, len16, len32, len64, netstring).
    """

    name: str

    def __post_init__(self) -> None:
        if self.name not in _CODECS:
            raise ValueError(f"unknown framing {self.name!r}")

    def decoder(self, max_frame: int = DEFAULT_MAX_FRAME) -> Decoder:
        """Return a fresh decoder for this framing.

        Args:
            max_frame: the largest frame accepted, in bytes (default 16 MiB).
        """
        return _CODECS[self.name][0](max_frame)

    def encode(self, payload: bytes) -> bytes:
        """Return the payload framed for the wire.

        Raises:
            ValueError: this framing cannot carry the payload (it contains the delimiter,
                or is longer than the length prefix can express).
        """
        return _CODECS[self.name][1](payload)


def parse_framing(spec: str) -> FramingSpec:
    """Parse a ``--framing`` value.

    Args:
        spec: raw, line, crlf, len8, len16, len32, len64 or netstring.

    Returns:
        The FramingSpec.

    Raises:
        UsageError: the spec is not a framing name (the message lists the choices).
    """
    if spec not in _CODECS:
        raise UsageError(f"--framing {spec!r} is not a framing (choose {', '.join(FRAMING_NAMES)})")
    return FramingSpec(spec)
