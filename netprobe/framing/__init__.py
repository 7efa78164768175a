"""Sans-IO framing: bytes in, frames out. No sockets, no clocks, no threads.

The shape is h11's: ``decoder.feed(data)`` with ``b""`` meaning EOF, then ``next_frame()``
until it returns ``NEED_DATA``. Encoders are plain functions returning bytes. Bad bytes from
the peer raise a FramingError subclass (FrameTooLarge, IncompleteFrame, MalformedFrame);
misusing an encoder raises ValueError.

    spec = parse_framing("len32")
    decoder = spec.decoder(max_frame=1 << 20)
    decoder.feed(spec.encode(b"hello") + spec.encode(b""))
    assert list(decoder.frames()) == [b"hello", b""]
"""

from __future__ import annotations

from netprobe.framing._base import DEFAULT_MAX_FRAME, NEED_DATA, Decoder, NeedData
from netprobe.framing._delimiter import DelimiterDecoder, encode_delimited
from netprobe.framing._length_prefix import (
    LENGTH_WIDTHS,
    LengthPrefixDecoder,
    encode_length_prefixed,
)
from netprobe.framing._netstring import NetstringDecoder, encode_netstring
from netprobe.framing._raw import RawDecoder, encode_raw
from netprobe.framing._spec import FRAMING_NAMES, FramingSpec, parse_framing

__all__ = [
    "DEFAULT_MAX_FRAME",
    "FRAMING_NAMES",
    "LENGTH_WIDTHS",
    "NEED_DATA",
    "Decoder",
    "DelimiterDecoder",
    "FramingSpec",
    "LengthPrefixDecoder",
    "NeedData",
    "NetstringDecoder",
    "RawDecoder",
    "encode_delimited",
    "encode_length_prefixed",
    "encode_netstring",
    "encode_raw",
    "parse_framing",
]
