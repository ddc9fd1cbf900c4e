"""Per-stream compression of DATA payloads: codecs behind a small interface, and the adaptive policy.

A :class:`Codec` turns a buffer into a self-contained body and back; the
session never sees anything else. Two implementations:

* :class:`PageCodec` - the native page codec (``dataplane.native.codec``:
  zero-page elision plus LZ4), imported lazily; wire codec id 1;
* :class:`ZlibCodec` - stdlib zlib, slower; for tests and as an explicit
  fallback; wire codec id 2.

:class:`CompressionPolicy` decides per frame whether to compress, in one of
three modes: ``"off"``, ``"on"`` or ``"auto"`` (the default). In ``auto`` it
stops compressing when

* the link outruns the compressor: the driver reports the connection's send
  queue empty for ``idle_frames`` consecutive frames (``set_send_backlog``);
* the data does not compress: a compressed frame saved less than
  ``min_saving``; compression then pauses for a back-off (in bytes) that
  doubles on every further failure, up to ``backoff_max``, then re-probes;

and compresses again as soon as the send queue is backlogged (the link is
the bottleneck). :class:`StreamCompressor` couples a policy with a codec's
encoder for one stream.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any, Protocol

from dataplane.channel.errors import CompressionError
from dataplane.channel.frames import CODEC_PAGE, CODEC_RAW, CODEC_ZLIB, Buffer

MODES = ("auto", "on", "off")


class Encoder(Protocol):
    """Stateful encoder of one stream (state: adaptive probing, statistics)."""

    @property
    def zero_pages(self) -> int:
        """Pages elided as all-zero so far (0 for codecs without zero elision)."""
        ...

    def encode(self, data: Buffer) -> bytes:
        """Encode *data* into a self-contained body."""
        ...


class Codec(Protocol):
    """A compression format the channel can carry; ``codec_id`` is its wire id (DATA flags)."""

    codec_id: int
    name: str
    #: Frames are screened by worth_trying and the encoder stores what does not compress raw by itself (then
    #: the policy does not back off).
    self_adapting: bool

    def new_encoder(self, mode: str) -> Encoder:
        """A fresh encoder; *mode* is ``"on"`` (always try) or ``"auto"`` (codec-internal probing)."""
        ...

    def worth_trying(self, data: Buffer) -> bool:
        """A quick look (far cheaper than encoding): False if *data* is surely not worth encoding."""
        ...

    def decode(self, body: Buffer, size: int) -> bytes:
        """Decode *body*, which must yield exactly *size* bytes; raises CompressionError otherwise."""
        ...


_native: Any = None
_native_error: str | None = None


def _load_native() -> Any:
    global _native, _native_error
    if _native is None and _native_error is None:
        try:
            from dataplane.native import codec as native
        except ImportError as exc:  # the native build is missing on this machine
            _native_error = f"{type(exc).__name__}: {exc}"
        else:
            _native = native
    return _native


def native_available() -> bool:
    """True if ``dataplane.native.codec`` can be imported (tried once, then cached)."""
    return _load_native() is not None


def native_import_error() -> str | None:
    """Why the native codec could not be imported, or None if it can."""
    _load_native()
    return _native_error


class PageCodec:
    """The native page codec: zero-page elision plus adaptive LZ4 (``dataplane.native.codec``).

    Raises ImportError on construction if the native module is unavailable.
    """

    codec_id = CODEC_PAGE
    name = "page"
    # Frames are screened by worth_trying (the page probe), and the encoder stores incompressible runs
    # raw by itself: the policy needs no back-off for this codec.
    self_adapting = True

    def __init__(self, page_size: int = 4096) -> None:
        native = _load_native()
        if native is None:
            raise ImportError(f"dataplane.native.codec is not importable ({_native_error})")
        self._native = native
        self.page_size = page_size

    def new_encoder(self, mode: str) -> Encoder:
        """A native PageEncoder in *mode* (``"on"`` or ``"auto"``)."""
        encoder: Encoder = self._native.PageEncoder(page_size=self.page_size, mode=mode)
        return encoder

    #: A frame is worth encoding when at least this fraction of its probed pages look compressible (or zero).
    MIN_COMPRESSIBLE = 1 / 32
    #: Probe every this many pages (32 pages of a 1 MiB frame).
    PROBE_STRIDE = 8

    def worth_trying(self, data: Buffer) -> bool:
        """Whether the page probe finds enough compressible or zero pages in *data* (~10 us per MiB).

        A random or encrypted frame then skips LZ4 (which would cost ~20 times
        more to find nothing), while a frame mixing random and text pages is
        still encoded page by page.
        """
        probed, good = self._native.probe_pages(data, self.page_size, self.PROBE_STRIDE)
        return good >= probed * self.MIN_COMPRESSIBLE

    def decode(self, body: Buffer, size: int) -> bytes:
        """Decode a page-codec body of exactly *size* bytes; raises CompressionError."""
        try:
            out: bytes = self._native.decode(body, size)
        except ValueError as exc:  # native CodecError is a ValueError
            raise CompressionError(f"page codec: {exc}") from None
        if len(out) != size:
            raise CompressionError(f"page codec body decodes to {len(out)} bytes, frame declares {size}")
        return out


class _ZlibEncoder:
    __slots__ = ("level",)
    zero_pages = 0

    def __init__(self, level: int) -> None:
        self.level = level

    def encode(self, data: Buffer) -> bytes:
        return zlib.compress(data, self.level)


class ZlibCodec:
    """zlib (stdlib) at a fast level: portable but far slower than the page codec."""

    codec_id = CODEC_ZLIB
    name = "zlib"
    self_adapting = False

    def __init__(self, level: int = 1) -> None:
        self.level = level

    def new_encoder(self, mode: str) -> Encoder:
        """A zlib encoder (*mode* is ignored: zlib has no internal probing)."""
        return _ZlibEncoder(self.level)

    def worth_trying(self, data: Buffer) -> bool:
        """Always True: the policy's back-off learns what zlib achieves."""
        return True

    def decode(self, body: Buffer, size: int) -> bytes:
        """Inflate *body* to exactly *size* bytes, never producing more; raises CompressionError."""
        d = zlib.decompressobj()
        try:
            out = d.decompress(body, size)
        except zlib.error as exc:
            raise CompressionError(f"zlib: {exc}") from None
        if len(out) != size or not d.eof or d.unused_data or d.unconsumed_tail:
            raise CompressionError(f"zlib body does not decode to exactly {size} bytes")
        return out


def make_codecs(names: Iterable[str]) -> list[Codec]:
    """Instantiate the codecs named in *names* (``"page"``, ``"zlib"``), skipping unavailable ones.

    ``"page"`` is skipped silently when the native module is missing (the
    channel then sends raw frames). Raises ValueError for an unknown name.
    """
    out: list[Codec] = []
    for name in names:
        if name == "page":
            if native_available():
                out.append(PageCodec())
        elif name == "zlib":
            out.append(ZlibCodec())
        else:
            raise ValueError(f"unknown codec {name!r} (known: 'page', 'zlib')")
    return out


def decoders() -> dict[int, Codec]:
    """Every codec this process can decode, by wire id (zlib always, the page codec if importable)."""
    table: dict[int, Codec] = {CODEC_ZLIB: ZlibCodec()}
    if native_available():
        table[CODEC_PAGE] = PageCodec()
    return table


def decoder_mask(table: dict[int, Codec]) -> int:
    """The HELLO/WELCOME ``codecs`` bit mask for a decoder table (raw is always understood)."""
    mask = 1 << CODEC_RAW
    for cid in table:
        mask |= 1 << cid
    return mask


class CompressionPolicy:
    """Decides, frame by frame, whether one stream compresses.

    Raises ValueError for an unknown mode.
    """

    __slots__ = ("_mode", "idle_frames", "min_saving", "min_frame", "backoff_min", "backoff_max",
                 "_idle", "_skip", "_backoff", "_why")

    def __init__(self, mode: str = "auto", *, idle_frames: int = 4, min_saving: float = 0.1,
                 min_frame: int = 4096, backoff_min: int = 1 << 20, backoff_max: int = 8 << 20) -> None:
        self._mode = _check_mode(mode)
        self.idle_frames = idle_frames
        self.min_saving = min_saving
        self.min_frame = min_frame
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._idle = 0
        self._skip = 0
        self._backoff = backoff_min
        self._why = ""

    @property
    def mode(self) -> str:
        """``"auto"``, ``"on"`` or ``"off"``."""
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self._mode = _check_mode(mode)
        self._idle = 0
        self._skip = 0
        self._backoff = self.backoff_min

    @property
    def state(self) -> str:
        """Human-readable current state: ``on``, ``off``, ``auto:on``, ``auto:off(idle-link)``, ..."""
        if self._mode != "auto":
            return self._mode
        return f"auto:off({self._why})" if self._why else "auto:on"

    def decide(self, nbytes: int, backlogged: bool) -> bool:
        """Whether to compress the next frame of *nbytes*, given the connection's send-queue state."""
        mode = self._mode
        if mode == "off" or nbytes < self.min_frame:
            return False
        if mode == "on":
            return True
        if backlogged:
            self._idle = 0
        else:
            self._idle += 1
            if self._idle >= self.idle_frames:
                self._why = "idle-link"
                return False
        if self._skip > 0:
            self._skip -= nbytes
            self._why = "incompressible"
            return False
        self._why = ""
        return True

    def skipped(self) -> None:
        """In ``auto``: the codec's quick look found the frame not worth compressing (goes raw)."""
        self._why = "incompressible"

    def record(self, nbytes: int, encoded: int) -> None:
        """Feed back the outcome of compressing *nbytes* into *encoded* bytes."""
        if self._mode != "auto":
            return
        if encoded > nbytes * (1.0 - self.min_saving):
            self._skip = self._backoff
            self._backoff = min(self._backoff * 2, self.backoff_max)
        else:
            self._backoff = self.backoff_min


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"compression mode must be one of {MODES}, got {mode!r}")
    return mode


class StreamCompressor:
    """Compression of one stream's outgoing DATA: a policy plus a lazily created encoder.

    *codec* None means no codec is usable with this peer: frames go raw.
    """

    __slots__ = ("codec", "policy", "_encoder", "_encoder_mode")

    def __init__(self, codec: Codec | None, mode: str = "auto") -> None:
        self.codec = codec
        self.policy = CompressionPolicy(mode)
        self._encoder: Encoder | None = None
        self._encoder_mode = ""

    @property
    def state(self) -> str:
        """The policy state, or ``"off(no codec)"``."""
        return self.policy.state if self.codec is not None else "off(no codec)"

    def set_mode(self, mode: str) -> None:
        """Switch to ``"auto"``, ``"on"`` or ``"off"``; raises ValueError for another value."""
        self.policy.mode = mode

    def encode(self, data: Buffer, backlogged: bool) -> tuple[Buffer, int, int]:
        """Return ``(payload, codec_id, zero_pages)`` for a DATA frame carrying *data*.

        The payload is *data* itself (codec id 0) when the policy says no or
        the body would not be smaller. Raises whatever the encoder raises on
        misuse (TypeError/ValueError for non-contiguous buffers).
        """
        codec = self.codec
        n = len(data)
        if codec is None or not self.policy.decide(n, backlogged):
            return data, CODEC_RAW, 0
        if self.policy.mode == "auto" and not codec.worth_trying(data):
            self.policy.skipped()
            return data, CODEC_RAW, 0
        # The page codec's encoder tries every run once the frame passed its probe. (Its own "auto"
        # sampling would skip compressible pages where random and text pages interleave: 0.69 against
        # 0.60 of the size.)
        mode = "on" if codec.self_adapting or self.policy.mode == "on" else "auto"
        enc = self._encoder
        if enc is None or self._encoder_mode != mode:
            enc = self._encoder = codec.new_encoder(mode)
            self._encoder_mode = mode
        z0 = enc.zero_pages
        body = enc.encode(data)
        if not codec.self_adapting:
            self.policy.record(n, len(body))
        if len(body) >= n:
            return data, CODEC_RAW, 0
        return body, codec.codec_id, enc.zero_pages - z0
