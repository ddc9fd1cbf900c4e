"""The send and reorder buffers of one stream (sans-IO, bounded): what the session core keeps of the
bytes it sent until they are acknowledged, and of the bytes it received out of order until the
gap before them is filled. Used by :mod:`dataplane.channel.stream_state`."""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from dataplane.channel.errors import ProtocolError
from dataplane.channel.frames import (
    Buffer,
    alloc,
)

# ====================================================================== buffers


class _SendBuffer:
    """Application bytes ``[released, end)`` of one stream: unacknowledged, in chunks.

    A chunk is either an immutable ``bytes`` kept by reference (a large
    ``send`` of bytes) or a bytearray that is only ever appended to: the
    *tail* chunk takes small writes (copied) and zero-copy writes
    (:meth:`get_buffer` / :meth:`commit`: a socket reads straight into it).
    Bytes once written are never modified, so the views handed out by
    :meth:`view` stay valid for as long as anyone holds them. ``view``
    returns a zero-copy view when the range lies in one chunk
    (:meth:`contiguous` says how far that is).
    """

    __slots__ = ("_chunks", "_starts", "_sizes", "_head", "_tail", "_handout", "_grow", "end")
    COALESCE = 64 * 1024  # writes at least this large of immutable bytes are kept by reference
    MIN_CHUNK = 64 * 1024
    MAX_CHUNK = 4 << 20

    def __init__(self) -> None:
        self._chunks: list[Buffer] = []
        self._starts: list[int] = []
        self._sizes: list[int] = []  # bytes written in each chunk (a tail bytearray may have room left)
        self._head = 0
        self._tail: bytearray | None = None  # the last chunk, when it is a bytearray with room left
        self._handout = 0  # size of the last get_buffer view (0: none outstanding)
        self._grow = self.MIN_CHUNK  # capacity of the next in-place chunk: doubles while they fill up
        self.end = 0

    def append(self, data: Buffer) -> None:
        n = len(data)
        if n >= self.COALESCE and (isinstance(data, bytes) or (isinstance(data, memoryview)
                                                               and isinstance(data.obj, bytes))):
            self._tail = None
            self._chunks.append(data)
            self._starts.append(self.end)
            self._sizes.append(n)
            self.end += n
            return
        mv = data if isinstance(data, memoryview) else memoryview(data)
        pos = 0
        while pos < n:
            tail = self._tail
            fill = self._sizes[-1] if tail is not None else 0
            if tail is None or fill == len(tail):
                tail = self._new_tail(n - pos)
                fill = 0
            take = min(len(tail) - fill, n - pos)
            tail[fill:fill + take] = mv[pos:pos + take]
            pos += take
            self._sizes[-1] = fill + take
            self.end += take

    def _new_tail(self, want: int) -> bytearray:
        tail = self._tail = alloc(max(self.MIN_CHUNK, min(self.MAX_CHUNK, want)))
        self._chunks.append(tail)
        self._starts.append(self.end)
        self._sizes.append(0)
        return tail

    def get_buffer(self, n: int) -> memoryview:
        """A writable view of up to *n* (> 0) bytes at the end; :meth:`commit` what was written into it.

        In-place chunks start at 64 KiB and double (up to *n*) each time one
        fills up, so an idle or interactive stream holds little memory and a
        bulk one reads in large pieces.
        """
        tail = self._tail
        room = len(tail) - self._sizes[-1] if tail is not None else 0
        if room < min(n, self.MIN_CHUNK):
            if tail is not None and room == 0:
                self._grow = min(self.MAX_CHUNK, 2 * len(tail))
            tail = self._new_tail(min(n, self._grow))
            room = len(tail)
        fill = self._sizes[-1]
        k = min(n, room)
        self._handout = k
        assert tail is not None
        return memoryview(tail)[fill:fill + k]

    def commit(self, n: int) -> None:
        """*n* bytes were written into the last :meth:`get_buffer` view. Raises ValueError beyond it."""
        if not 0 <= n <= self._handout:
            raise ValueError(f"{n} bytes written into a send buffer of {self._handout}")
        self._handout = 0
        self._sizes[-1] += n
        self.end += n

    def contiguous(self, off: int) -> int:
        """Bytes from *off* (not released, below ``end``) to the end of its chunk."""
        i = bisect_right(self._starts, off, self._head) - 1
        return self._starts[i] + self._sizes[i] - off

    def view(self, off: int, n: int) -> Buffer:
        starts = self._starts
        i = bisect_right(starts, off, self._head) - 1
        chunk = self._chunks[i]
        rel = off - starts[i]
        size = self._sizes[i]
        if rel + n <= size:
            if rel == 0 and n == len(chunk) and isinstance(chunk, bytes):
                return chunk
            return memoryview(chunk)[rel:rel + n]
        parts = [memoryview(chunk)[rel:size]]
        got = size - rel
        while got < n:
            i += 1
            c = self._chunks[i]
            take = min(self._sizes[i], n - got)
            parts.append(memoryview(c)[:take])
            got += take
        return b"".join(parts)

    def release(self, upto: int) -> None:
        chunks, starts, sizes = self._chunks, self._starts, self._sizes
        if self._tail is not None and self._handout == 0 and starts[-1] + sizes[-1] <= upto:
            self._tail = None  # everything acknowledged: do not keep an idle chunk
        h = self._head
        last = len(chunks) - 1
        while h < len(chunks) and starts[h] + sizes[h] <= upto and not (h == last and self._tail is not None):
            chunks[h] = b""
            h += 1
        if h > 32 and h * 2 > len(chunks):
            del chunks[:h]
            del starts[:h]
            del sizes[:h]
            h = 0
        self._head = h

    def clear(self) -> None:
        self._chunks.clear()
        self._starts.clear()
        self._sizes.clear()
        self._head = 0
        self._tail = None
        self._handout = 0


class _Reorder:
    """Out-of-order received pieces of one stream: disjoint, by offset, at most ``max_pieces``.

    ``starts`` is the sorted list of the pieces' offsets and ``chunks`` maps
    each offset to its bytes. An insert finds its place by bisection and
    moves only the offsets after it, one pointer each; since the number of
    pieces is bounded (:meth:`insert` refuses to go beyond ``max_pieces``),
    no insert moves more than that many, whatever order pieces come in.
    """

    __slots__ = ("starts", "chunks", "nbytes", "max_pieces")

    def __init__(self, max_pieces: int) -> None:
        self.starts: list[int] = []
        self.chunks: dict[int, Buffer] = {}
        self.nbytes = 0
        self.max_pieces = max_pieces

    def __bool__(self) -> bool:
        return bool(self.starts)

    def __len__(self) -> int:
        """Pieces held."""
        return len(self.starts)

    def insert(self, off: int, data: Buffer) -> int:
        """Store the parts of ``[off, off+len)`` not already held; return the bytes stored.

        Raises ProtocolError, storing nothing, if that would hold more than
        ``max_pieces`` pieces (a peer flooding small out-of-order frames).
        """
        end = off + len(data)
        starts, chunks = self.starts, self.chunks
        i = bisect_right(starts, off)
        cur = off
        if i > 0:
            prev = starts[i - 1]
            prev_end = prev + len(chunks[prev])
            if prev_end > cur:
                cur = prev_end
        pieces: list[tuple[int, int]] = []
        while cur < end:
            if i < len(starts) and starts[i] < end:
                s = starts[i]
                if s > cur:
                    pieces.append((cur, s))
                cur = max(cur, s + len(chunks[s]))
                i += 1
            else:
                pieces.append((cur, end))
                cur = end
        if len(starts) + len(pieces) > self.max_pieces:
            raise ProtocolError(f"more than {self.max_pieces} pieces of data held out of order "
                                "(a flood of small out-of-order frames)")
        stored = 0
        for a, b in pieces:
            piece = data if (a == off and b == end) else memoryview(data)[a - off:b - off]
            starts.insert(bisect_left(starts, a), a)
            chunks[a] = piece
            stored += b - a
        self.nbytes += stored
        return stored

    def pop_ready(self, nxt: int) -> list[tuple[int, Buffer]]:
        """Remove and return the chunks that continue the stream at *nxt*, trimmed, in order."""
        out: list[tuple[int, Buffer]] = []
        starts, chunks = self.starts, self.chunks
        k = 0
        while k < len(starts) and starts[k] <= nxt:
            s = starts[k]
            d = chunks.pop(s)
            k += 1
            self.nbytes -= len(d)
            e = s + len(d)
            if e <= nxt:
                continue
            if s < nxt:
                d = memoryview(d)[nxt - s:]
                s = nxt
            out.append((s, d))
            nxt = e
        if k:
            del starts[:k]
        return out

    def clear(self) -> None:
        self.starts.clear()
        self.chunks.clear()
        self.nbytes = 0
