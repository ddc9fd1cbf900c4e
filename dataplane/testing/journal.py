"""Host-side checker of the test guest's disk journal and serial console.

The guest agent (``agent/agent.c``) writes a header block at offset 0 and then
fixed-size records, one per slot, wrapping around the device; it prints
``ACK <seq>`` on the serial console once a record is durable. After a storage
migration (or a crash) :func:`verify_journal` proves from the disk image alone
that no acknowledged record was lost or torn: every record carries its own
sequence number, slot, writer ``boot_id``, a payload derived from
``(boot_id, seq)`` and a CRC-32 over the whole record. The layout is
documented in ``docs/test-guest.md``; it must change together with the agent.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "HEADER_SIZE",
    "JOURNAL_VERSION",
    "Heartbeat",
    "JournalError",
    "JournalReport",
    "RamBad",
    "RamCheckPass",
    "SerialLog",
    "encode_header",
    "encode_record",
    "parse_serial",
    "record_offset",
    "record_payload",
    "verify_journal",
]

JOURNAL_VERSION = 1
HEADER_SIZE = 4096
REC_HEADER_SIZE = 64
HDR_MAGIC = b"DPJHDR01"
REC_MAGIC = b"DPJRNL01"
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_HDR = struct.Struct("<8sIIQQQQ")  # magic, version, rec_size, boot_id, nslots, data_offset, dev_size
_REC = struct.Struct("<8sIIQQQQQQ")  # magic, version, rec_size, boot_id, seq, slot, nslots, t_ns, reserved


class JournalError(AssertionError):
    """The journal violates an invariant (lost, torn, corrupt or out-of-order records).

    Subclasses AssertionError so that pytest shows it as a test failure.
    """


@dataclass(frozen=True)
class JournalReport:
    """What :func:`verify_journal` found on a disk that passed every check."""

    boot_id: str  # writer of the header (the current boot), 16 hex digits
    records: int  # valid records of the current boot
    first_seq: int  # oldest surviving record of the current boot (0 if none)
    last_seq: int  # newest record of the current boot (0 if none)
    nslots: int
    rec_size: int
    wrapped: bool  # the journal went around the device at least once
    torn_tail: bool  # the slot after last_seq holds an unacknowledged, partly written record
    stale_records: int  # intact records of earlier boots not yet overwritten
    boot_ids: frozenset[str] = field(default_factory=frozenset)  # every boot_id seen (header and records)


@dataclass(frozen=True)
class Heartbeat:
    """One ``HB <counter> <boot_id> <uptime_ms>`` line."""

    counter: int
    boot_id: str
    uptime_ms: int


@dataclass(frozen=True)
class RamBad:
    """One ``RAMBAD page=.. expected_gen=.. found_gen=.. why=.. by=..`` line: a guest page whose
    content is not what the agent last wrote there (``found_gen`` is -1 when the page holds no stamp)."""

    page: int
    expected_gen: int
    found_gen: int
    why: str
    by: str

    def __str__(self) -> str:
        return (f"page {self.page}: expected generation {self.expected_gen}, found {self.found_gen} "
                f"({self.why}, seen by the {self.by})")


@dataclass(frozen=True)
class RamCheckPass:
    """One ``RAMCHECK <pass> pages=.. bad=.. raced=.. ms=..`` line: the checker walked the whole area."""

    number: int
    pages: int
    bad: int
    raced: int
    ms: int


#: Console lines of a guest kernel that hit a bug: the guest cannot be trusted after one.
KERNEL_FAULT_RE = re.compile(
    r"^.*(?:kernel BUG at|BUG: |Oops|Kernel panic|general protection fault|list_(?:add|del) corruption"
    r"|Unable to handle kernel|segfault at|invalid opcode:|RIP: 00|WARNING: CPU: ).*$",
    re.MULTILINE,
)


@dataclass
class SerialLog:
    """The agent's lines parsed from a serial console log."""

    heartbeats: list[Heartbeat] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "ERR ..." lines
    dirty: list[tuple[int, int]] = field(default_factory=list)  # (total_bytes, kib_per_s)
    journal: list[str] = field(default_factory=list)  # "JOURNAL ..." lines
    agent_starts: list[str] = field(default_factory=list)  # boot_id of each "DPAGENT" line
    ram_bad: list[RamBad] = field(default_factory=list)  # "RAMBAD ..." lines
    ram_passes: list[RamCheckPass] = field(default_factory=list)  # "RAMCHECK ..." lines
    kernel_faults: list[str] = field(default_factory=list)  # kernel BUG / Oops / panic lines

    @property
    def max_ack(self) -> int:
        """Highest acknowledged sequence number (0 if none)."""
        return max(self.acks, default=0)

    def problems(self) -> list[str]:
        """What this log shows going wrong with the guest's memory or kernel (empty if nothing)."""
        out = [f"RAM {bad}" for bad in self.ram_bad[:8]]
        out += [f"checker pass {p.number}: {p.bad} bad page(s)" for p in self.ram_passes if p.bad][:4]
        out += [f"kernel: {line}" for line in self.kernel_faults[:8]]
        return out

    @property
    def boot_ids(self) -> list[str]:
        """Distinct heartbeat boot_ids in order of appearance."""
        return list(dict.fromkeys(hb.boot_id for hb in self.heartbeats))


_LINE_RE = re.compile(
    r"(?:^|(?<=[\s\]]))(?:"
    r"HB (?P<hb>\d+) (?P<boot>[0-9a-f]{16}) (?P<up>\d+)"
    r"|ACK (?P<ack>\d+)"
    r"|DIRTY (?P<dtotal>\d+) (?P<drate>\d+)"
    r"|(?P<err>ERR [^\r\n]*)"
    r"|(?P<jrnl>JOURNAL [^\r\n]*)"
    r"|DPAGENT (?P<agent>[0-9a-f]{16})(?: [^\r\n]*)?"
    r"|RAMBAD page=(?P<bpage>\d+) expected_gen=(?P<bexp>\d+) found_gen=(?P<bfound>-?\d+)"
    r" why=(?P<bwhy>\S+) by=(?P<bby>\S+)"
    r"|RAMCHECK (?P<cpass>\d+) pages=(?P<cpages>\d+) bad=(?P<cbad>\d+) raced=(?P<craced>\d+)"
    r" ms=(?P<cms>\d+)"
    r")[ \t]*\r?$",
    re.MULTILINE,
)


def parse_serial(log_text: str) -> SerialLog:
    """Parse the agent's lines (HB, ACK, DIRTY, ERR, JOURNAL, DPAGENT, RAMBAD, RAMCHECK) and the
    kernel's fault lines (BUG, Oops, panic, ...) out of a serial log.

    Lines that are incomplete (no line end yet) or garbled by kernel messages
    are ignored. Never raises on malformed input.
    """
    out = SerialLog()
    complete = log_text[: log_text.rfind("\n") + 1]
    for m in _LINE_RE.finditer(complete):
        if m["hb"] is not None:
            out.heartbeats.append(Heartbeat(int(m["hb"]), m["boot"], int(m["up"])))
        elif m["ack"] is not None:
            out.acks.append(int(m["ack"]))
        elif m["dtotal"] is not None:
            out.dirty.append((int(m["dtotal"]), int(m["drate"])))
        elif m["err"] is not None:
            out.errors.append(m["err"].strip())
        elif m["jrnl"] is not None:
            out.journal.append(m["jrnl"].strip())
        elif m["agent"] is not None:
            out.agent_starts.append(m["agent"])
        elif m["bpage"] is not None:
            out.ram_bad.append(RamBad(int(m["bpage"]), int(m["bexp"]), int(m["bfound"]), m["bwhy"], m["bby"]))
        elif m["cpass"] is not None:
            out.ram_passes.append(RamCheckPass(int(m["cpass"]), int(m["cpages"]), int(m["cbad"]),
                                               int(m["craced"]), int(m["cms"])))
    out.kernel_faults = [m.group(0).strip() for m in KERNEL_FAULT_RE.finditer(complete)]
    return out


# --------------------------------------------------------------------------- records


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def record_payload(boot_id: int, seq: int, length: int) -> bytes:
    """Return the payload the agent writes for record *seq* of *boot_id* (*length* bytes)."""
    seed = boot_id ^ ((seq * _GOLDEN) & _M64)
    block = b"".join(struct.pack("<Q", _mix64((seed + (i + 1) * _GOLDEN) & _M64)) for i in range(8))
    reps = -(-length // 64)
    return (block * reps)[:length]


def encode_header(boot_id: int, rec_size: int, nslots: int, dev_size: int) -> bytes:
    """Return the 4096-byte header block the agent writes at offset 0 (for tests and tools)."""
    buf = bytearray(HEADER_SIZE)
    _HDR.pack_into(buf, 0, HDR_MAGIC, JOURNAL_VERSION, rec_size, boot_id, nslots, HEADER_SIZE, dev_size)
    struct.pack_into("<I", buf, HEADER_SIZE - 4, zlib.crc32(memoryview(buf)[: HEADER_SIZE - 4]))
    return bytes(buf)


def encode_record(boot_id: int, seq: int, rec_size: int, nslots: int, t_ns: int = 0) -> bytes:
    """Return journal record *seq* exactly as the agent writes it (for tests and tools).

    Raises ValueError if *seq* < 1 or *rec_size* is not a multiple of 512.
    """
    if seq < 1 or rec_size < 512 or rec_size % 512:
        raise ValueError(f"bad record seq={seq} rec_size={rec_size}")
    slot = (seq - 1) % nslots
    head = _REC.pack(REC_MAGIC, JOURNAL_VERSION, rec_size, boot_id, seq, slot, nslots, t_ns, 0)
    body = head + record_payload(boot_id, seq, rec_size - 4 - REC_HEADER_SIZE)
    return body + struct.pack("<I", zlib.crc32(body))


def record_offset(seq: int, rec_size: int, nslots: int) -> int:
    """Byte offset on the disk of the slot that holds record *seq*."""
    return HEADER_SIZE + ((seq - 1) % nslots) * rec_size


def _crc_ok(buf: bytes, size: int) -> bool:
    (stored,) = struct.unpack_from("<I", buf, size - 4)
    return zlib.crc32(memoryview(buf)[: size - 4]) == stored


class _Image:
    """Random read access to a raw image (a file or bytes), with its data extents."""

    def __init__(self, path: Path | None, data: bytes | None) -> None:
        self._data = data
        self._fh = open(path, "rb") if path is not None else None  # noqa: SIM115 - closed in close()
        if self._fh is not None:
            self.size = os.fstat(self._fh.fileno()).st_size
        else:
            self.size = len(data or b"")

    def read(self, offset: int, length: int) -> bytes:
        if self._data is not None:
            return self._data[offset : offset + length]
        assert self._fh is not None
        self._fh.seek(offset)
        return self._fh.read(length)

    def data_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """Ranges of [start, end) that may hold non-zero data (holes of a sparse file skipped)."""
        if self._fh is None:
            return [(start, end)]
        fd = self._fh.fileno()
        ranges: list[tuple[int, int]] = []
        pos = start
        try:
            while pos < end:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after pos
                    break
                if data >= end:
                    break
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
                ranges.append((data, hole))
                pos = hole
        except (AttributeError, OSError):
            return [(start, end)]
        return ranges

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


@contextmanager
def _open_image(image: str | os.PathLike[str] | bytes, fmt: str) -> Iterator[_Image]:
    if fmt not in ("raw", "qcow2"):
        raise ValueError(f"unsupported image format {fmt!r} (raw or qcow2)")
    if fmt == "raw":
        img = (
            _Image(None, bytes(image)) if isinstance(image, bytes | bytearray) else _Image(Path(image), None)
        )
        try:
            yield img
        finally:
            img.close()
        return
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise JournalError(
            "qemu-img is not installed: cannot read a qcow2 image (apt-get install qemu-utils)"
        )
    with tempfile.TemporaryDirectory(prefix="dp-journal-") as tmp:
        src = Path(tmp) / "src.qcow2"
        if isinstance(image, bytes | bytearray):
            src.write_bytes(image)
        else:
            src = Path(image)
        dst = Path(tmp) / "image.raw"
        # -U: also readable while a (stopped or dead) QEMU still holds the image lock.
        proc = subprocess.run(
            [qemu_img, "convert", "-U", "-f", "qcow2", "-O", "raw", str(src), str(dst)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            name = "<bytes>" if isinstance(image, bytes | bytearray) else str(image)
            raise JournalError(f"cannot read qcow2 image {name}: {proc.stderr.strip()}")
        img = _Image(dst, None)
        try:
            yield img
        finally:
            img.close()


def _parse_header(img: _Image, where: str) -> tuple[int, int, int]:
    """Return (boot_id, rec_size, nslots) from the header block; raise JournalError if invalid."""
    if img.size < HEADER_SIZE:
        raise JournalError(f"{where}: image is {img.size} bytes, smaller than the journal header")
    hdr = img.read(0, HEADER_SIZE)
    magic, version, rec_size, boot_id, nslots, data_offset, _dev_size = _HDR.unpack_from(hdr)
    if magic != HDR_MAGIC:
        if hdr.count(0) == HEADER_SIZE:
            raise JournalError(f"{where}: no journal header at offset 0 (the disk was never written)")
        raise JournalError(f"{where}: bad journal header magic {magic!r} at offset 0")
    if not _crc_ok(hdr, HEADER_SIZE):
        raise JournalError(f"{where}: journal header checksum mismatch (torn or corrupt header block)")
    if version != JOURNAL_VERSION:
        raise JournalError(f"{where}: journal version {version}, this checker reads {JOURNAL_VERSION}")
    if data_offset != HEADER_SIZE or rec_size < 512 or rec_size % 512 or nslots < 1:
        raise JournalError(
            f"{where}: implausible journal geometry rec={rec_size} nslots={nslots} data_offset={data_offset}"
        )
    need = HEADER_SIZE + nslots * rec_size
    if img.size < need:
        raise JournalError(
            f"{where}: image is {img.size} bytes but the journal needs {need} "
            f"({nslots} slots of {rec_size}): truncated copy"
        )
    return boot_id, rec_size, nslots


def _check_record(buf: bytes, rec_size: int, nslots: int, slot: int) -> tuple[int, int] | str:
    """Return (boot_id, seq) of a valid record, or a reason why the slot is not one."""
    magic, version, size, boot_id, seq, rslot, rnslots, _t, _res = _REC.unpack_from(buf)
    if magic != REC_MAGIC:
        return f"bad magic {magic!r}"
    if not _crc_ok(buf, rec_size):
        return "checksum mismatch"
    if version != JOURNAL_VERSION or size != rec_size or rnslots != nslots:
        return f"foreign geometry (version={version} rec={size} nslots={rnslots})"
    if seq < 1 or rslot != slot or (seq - 1) % nslots != slot:
        return f"seq {seq} claims slot {rslot} but sits in slot {slot}"
    if buf[REC_HEADER_SIZE : rec_size - 4] != record_payload(boot_id, seq, rec_size - 4 - REC_HEADER_SIZE):
        return f"payload of seq {seq} does not match (boot_id {boot_id:016x})"
    return boot_id, seq


def _iter_slots(img: _Image, rec_size: int, nslots: int) -> Iterator[tuple[int, bytes]]:
    """Yield (slot, bytes) for every slot that may hold data (holes skipped)."""
    end = HEADER_SIZE + nslots * rec_size
    seen = -1
    chunk_slots = max(1, (8 << 20) // rec_size)
    for start, stop in img.data_ranges(HEADER_SIZE, end):
        first = max((start - HEADER_SIZE) // rec_size, seen + 1)
        last = min((stop - 1 - HEADER_SIZE) // rec_size, nslots - 1)
        slot = first
        while slot <= last:
            n = min(chunk_slots, last - slot + 1)
            data = img.read(HEADER_SIZE + slot * rec_size, n * rec_size)
            for i in range(n):
                yield slot + i, data[i * rec_size : (i + 1) * rec_size]
            slot += n
        seen = max(seen, last)


def _ranges(seqs: list[int]) -> str:
    parts: list[str] = []
    start = prev = seqs[0]
    for s in [*seqs[1:], None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        parts.append(str(start) if start == prev else f"{start}..{prev}")
        if s is not None:
            start = prev = s
    return ", ".join(parts[:10]) + (" ..." if len(parts) > 10 else "")


def verify_journal(
    image: str | os.PathLike[str] | bytes,
    fmt: str = "raw",
    acked_upto: int | None = None,
    *,
    expect_boot_id: str | None = None,
) -> JournalReport:
    """Check the guest journal on a disk image and return what it holds.

    *image* is a path to a raw or qcow2 image (``fmt``) or the raw bytes of
    one. Checks: the header block is intact; every non-empty slot holds an
    intact record (magic, CRC-32, slot number, payload derived from
    ``(boot_id, seq)``); the records of the current boot (the header's
    ``boot_id``) form one contiguous run of sequence numbers ending at the
    newest, as long as the device allows (``nslots``, wrap-around); the only
    slot allowed to be torn is the one the next, never acknowledged, record
    was being written to; and, if *acked_upto* is given, every acknowledged
    sequence number up to it is on disk (those older than the surviving
    window were overwritten by newer records, as designed). With
    *expect_boot_id* the header must name that boot.

    Read the image of a stopped or killed VM: a running QEMU may still hold
    qcow2 metadata in memory.

    Raises JournalError (an AssertionError) with the offending slot/seq on
    any violation, including an image without a journal; ValueError for an
    unknown *fmt*.
    """
    where = "<bytes>" if isinstance(image, bytes | bytearray) else str(image)
    with _open_image(image, fmt) as img:
        boot_id, rec_size, nslots = _parse_header(img, where)
        boot_hex = f"{boot_id:016x}"
        if expect_boot_id is not None and boot_hex != expect_boot_id.lower():
            raise JournalError(f"{where}: journal written by boot {boot_hex}, expected {expect_boot_id}")
        current: dict[int, int] = {}  # seq -> slot
        bad: dict[int, str] = {}  # slot -> reason
        stale = 0
        boot_ids = {boot_hex}
        zero = bytes(rec_size)
        for slot, buf in _iter_slots(img, rec_size, nslots):
            if buf == zero:
                continue
            res = _check_record(buf, rec_size, nslots, slot)
            if isinstance(res, str):
                bad[slot] = res
                continue
            rboot, seq = res
            boot_ids.add(f"{rboot:016x}")
            if rboot == boot_id:
                current[seq] = slot
            else:
                stale += 1

    last = max(current, default=0)
    torn_slot = last % nslots
    torn_tail = False
    for slot, reason in sorted(bad.items()):
        if slot == torn_slot and (acked_upto is None or acked_upto <= last):
            torn_tail = True  # the in-flight, never acknowledged record after the newest one
            continue
        off = HEADER_SIZE + slot * rec_size
        raise JournalError(f"{where}: torn or corrupt record in slot {slot} (offset {off}): {reason}")
    if acked_upto is not None and acked_upto > last:
        raise JournalError(
            f"{where}: acknowledged seq {acked_upto} is not on disk (newest record of boot {boot_hex} "
            f"is seq {last}): acknowledged writes were lost"
        )
    lo = max(1, last - nslots + (2 if torn_tail else 1)) if last else 1
    missing = [s for s in range(lo, last + 1) if s not in current]
    if missing:
        raise JournalError(
            f"{where}: records lost: seq {_ranges(missing)} missing from the run {lo}..{last} "
            f"of boot {boot_hex}"
        )
    return JournalReport(
        boot_id=boot_hex,
        records=len(current),
        first_seq=min(current, default=0),
        last_seq=last,
        nslots=nslots,
        rec_size=rec_size,
        wrapped=last > nslots,
        torn_tail=torn_tail,
        stale_records=stale,
        boot_ids=frozenset(boot_ids),
    )
