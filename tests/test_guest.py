"""The real test guest: boot, heartbeat, memory dirtier and disk journal (QEMU under TCG)."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from dataplane.testing.guest import REPO_ROOT, GuestArtifacts, kernel_cmdline
from dataplane.testing.journal import (
    HEADER_SIZE,
    JournalError,
    encode_header,
    encode_record,
    parse_serial,
    record_offset,
    verify_journal,
)
from dataplane.testing.ramstamp import stamped_pages
from dataplane.testing.vm import Disk, GuestRamError, make_disk

PAGE = 4096


# --------------------------------------------------------------------------- builder


@pytest.mark.e2e
def test_guest_build_is_cached(guest: GuestArtifacts):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "dataplane.testing.guest"]
    subprocess.run([*cmd, "build"], check=True, env=env, cwd=REPO_ROOT)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5, f"a build with a complete cache took {elapsed:.2f} s"
    out = subprocess.run(
        [*cmd, "path"],
        check=True,
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    ).stdout
    paths = json.loads(out)
    assert Path(paths["kernel"]) == guest.kernel and guest.kernel.is_file()
    assert Path(paths["initrd"]) == guest.initrd and guest.initrd.is_file()
    assert paths["modules"][-1] == "virtio_blk"
    order = paths["modules"]
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_pci")


def test_kernel_cmdline_parameters():
    line = kernel_cmdline({"hb_ms": 50, "dp.pattern": "text"})
    assert "console=ttyS0" in line.split(" ")[0]
    assert line.endswith("dp.hb_ms=50 dp.pattern=text")
    with pytest.raises(ValueError):
        kernel_cmdline({"disk": "/dev/vda dp.x=1"})


# --------------------------------------------------------------------------- heartbeat


@pytest.mark.e2e
def test_boot_heartbeat_and_missing_disk(vm_factory):
    t0 = time.monotonic()
    # No disk attached although the journal is on: the agent must say so and keep beating.
    vm = vm_factory(cmdline={"hb_ms": 100, "disk_rate": 10})
    first = vm.wait_heartbeat(1, timeout=30)[0]
    boot_s = time.monotonic() - t0
    beats = vm.wait_heartbeat(3, timeout=10, newer_than=first.counter)
    print(f"first heartbeat {boot_s:.2f} s after QEMU start")
    assert len({hb.boot_id for hb in [first, *beats]}) == 1
    counters = [hb.counter for hb in [first, *beats]]
    assert counters == sorted(counters) and len(set(counters)) == len(counters)
    assert beats[-1].uptime_ms > first.uptime_ms
    vm.wait_for_serial(r"^ERR disk: open /dev/vda: ", timeout=15)
    later = vm.wait_heartbeat(1, timeout=5, newer_than=vm.heartbeats()[-1].counter)
    assert later[0].boot_id == first.boot_id
    log = vm.serial()
    assert log.agent_starts == [first.boot_id]
    assert log.acks == []


# --------------------------------------------------------------------------- memory dirtier


def _pages(buf: mmap.mmap) -> list[int]:
    view = memoryview(buf)
    try:
        return [zlib.crc32(view[i : i + PAGE]) for i in range(0, len(buf), PAGE)]
    finally:
        view.release()


@pytest.mark.e2e
@pytest.mark.parametrize("pattern", ["text", "random", "zero"])
def test_dirtier_rewrites_guest_ram(vm_factory, tmp_path, pattern):
    ram = tmp_path / "guest.ram"
    vm = vm_factory(
        memory_mib=128,
        memory_backend_path=ram,
        cmdline={"hb_ms": 100, "dirty_mib": 32, "dirty_rate": 20, "pattern": pattern},
    )
    vm.wait_for_serial(r"^DIRTY_READY 32 ", timeout=30)
    if pattern == "zero":
        # Rewriting zeros with zeros changes no byte: the achieved rate the agent reports is the evidence.
        vm.wait_for_serial(r"^DIRTY \d+ \d+", timeout=10)
        (_, kib), *_ = vm.serial().dirty
        assert 0.75 * 20 * 1024 <= kib <= 1.25 * 20 * 1024, vm.serial().dirty
        return
    with open(ram, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mem:
        assert len(mem) == 128 << 20
        before = _pages(mem)
        time.sleep(1.5)
        after = _pages(mem)
        changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
        sample = b"".join(mem[i * PAGE : (i + 1) * PAGE] for i in changed[:2048])
    # The agent reports its achieved rate (KiB/s) about once a second.
    vm.wait_for_serial(r"^DIRTY \d+ \d+", timeout=10)
    reported = sorted(kib for _, kib in vm.serial().dirty)
    assert 0.75 * 20 * 1024 <= reported[len(reported) // 2] <= 1.25 * 20 * 1024, reported
    # 20 MiB/s for 1.5 s is ~7700 pages; demand at least a third of that, seen from the host.
    assert len(changed) >= 2500, f"only {len(changed)} guest pages changed in 1.5 s"
    ratio = len(sample) / len(zlib.compress(sample, 1))
    print(f"{pattern}: {len(changed)} pages changed in 1.5 s, compress ratio {ratio:.2f}:1")
    if pattern == "text":
        assert ratio > 2.0, f"text pages compress only {ratio:.2f}:1"
        words = sample.count(b" migration ") + sample.count(b" memory ")
        assert words > 100 and sample.count(b"page ") > 100
    else:
        assert ratio < 1.1, f"random pages compress {ratio:.2f}:1"


# --------------------------------------------------------------------------- RAM checker


def _wait_rewritten(mem: mmap.mmap, offset: int, gen: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while int.from_bytes(mem[offset + 8 : offset + 16], "little") <= gen:
        assert time.monotonic() < deadline, f"the page at {offset:#x} was not rewritten within {timeout} s"
        time.sleep(0.02)


@pytest.mark.e2e
@pytest.mark.parametrize("pattern", ["random", "text"])
def test_ram_checker_finds_a_lost_write_and_a_flipped_byte(vm_factory, tmp_path, pattern):
    """The guest's checker notices what a migration that loses RAM would leave: a page that holds
    an older generation (a rewrite that never arrived) and a page with a damaged byte."""
    ram = tmp_path / "guest.ram"
    vm = vm_factory(memory_mib=128, memory_backend_path=ram,
                    cmdline={"dirty_mib": 16, "dirty_rate": 8, "pattern": pattern})
    passes = vm.verify_ram(2, 60)  # clean so far: two whole passes, nothing bad
    assert passes[-1].pages == 16 * 256 and passes[-1].bad == 0
    with open(ram, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mem:
        pages = stamped_pages(mem)
        assert len(pages) == 16 * 256, f"found {len(pages)} stamped pages in guest RAM"
        stale, flipped = pages[100], pages[3000]
        old = mem[stale.offset : stale.offset + PAGE]
        _wait_rewritten(mem, stale.offset, stale.generation)  # the dirtier moved it on...
        mem[stale.offset : stale.offset + PAGE] = old  # ... and that rewrite is "lost"
        mem[flipped.offset + 2000] ^= 0x10
    bad = vm.wait_for_serial(
        rf"^RAMBAD page=100 expected_gen=\d+ found_gen={stale.generation} why=stale by=\w+", 30)
    assert int(bad.group(0).split("expected_gen=")[1].split()[0]) > stale.generation
    vm.wait_for_serial(r"^RAMBAD page=3000 expected_gen=\d+ found_gen=\d+ why=checksum by=\w+", 30)
    with pytest.raises(GuestRamError, match=r"page 100: expected generation \d+, found \d+ \(stale"):
        vm.verify_ram(2, 30)
    n = vm.heartbeats()[-1].counter
    vm.wait_heartbeat(3, 10, newer_than=n)  # the agent reports and keeps running
    # Once the dirtier has rewritten both pages (every 2 s), whole passes are clean again.
    seen = len(vm.serial().ram_passes)
    deadline = time.monotonic() + 20
    while not [p for p in vm.serial().ram_passes[seen:] if p.bad == 0]:
        assert time.monotonic() < deadline, vm.serial().ram_passes[-5:]
        time.sleep(0.1)


def test_parse_serial_ram_lines_and_kernel_faults():
    text = (
        "HB 1 00000000000000aa 10\r\nRAMCHECK 1 pages=4096 bad=0 raced=1 ms=125\r\n"
        "RAMBAD page=7 expected_gen=4 found_gen=3 why=stale by=checker\r\n"
        "RAMBAD page=9 expected_gen=4 found_gen=-1 why=zeroed by=dirtier\r\n"
        "RAMCHECK 2 pages=4096 bad=2 raced=0 ms=130\r\n"
        "[   12.5] list_del corruption. prev->next should be ffff8880, but was dead000000000122\r\n"
        "[   12.5] kernel BUG at lib/list_debug.c:59!\r\n"
    )
    log = parse_serial(text)
    assert [(p.number, p.bad, p.raced, p.ms) for p in log.ram_passes] == [(1, 0, 1, 125), (2, 2, 0, 130)]
    assert [(b.page, b.expected_gen, b.found_gen, b.why, b.by) for b in log.ram_bad] == [
        (7, 4, 3, "stale", "checker"), (9, 4, -1, "zeroed", "dirtier")]
    assert len(log.kernel_faults) == 2 and "kernel BUG at" in log.kernel_faults[1]
    problems = log.problems()
    assert problems[0] == "RAM page 7: expected generation 4, found 3 (stale, seen by the checker)"
    assert any("kernel BUG" in p for p in problems)
    clean = "HB 1 00000000000000aa 10\r\nRAMCHECK 1 pages=1 bad=0 raced=0 ms=1\r\n"
    assert parse_serial(clean).problems() == []


# --------------------------------------------------------------------------- disk journal


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x40]) + data[offset + 1 :]


@pytest.mark.e2e
def test_disk_journal_raw_survives_kill_and_detects_damage(vm_factory, tmp_path):
    disk = make_disk(tmp_path / "journal.raw", "64M", "raw")
    vm = vm_factory(disks=[Disk(disk, "raw")], cmdline={"hb_ms": 100, "disk_rate": 50})
    vm.wait_acks(60, timeout=40)
    boot_id = vm.heartbeats()[0].boot_id
    vm.kill()
    acked = vm.serial().max_ack
    assert acked >= 60

    report = verify_journal(disk, "raw", acked_upto=acked, expect_boot_id=boot_id)
    assert report.first_seq == 1 and report.last_seq >= acked
    assert report.records == report.last_seq and not report.wrapped
    assert report.nslots == (64 * 2**20 - HEADER_SIZE) // 4096 and report.rec_size == 4096
    assert report.boot_ids == {boot_id}

    image = disk.read_bytes()
    nslots, rec = report.nslots, report.rec_size
    assert verify_journal(image, acked_upto=acked).last_seq == report.last_seq

    # One flipped byte in the payload of an acknowledged record.
    bad = _flip(image, record_offset(10, rec, nslots) + 1000)
    with pytest.raises(JournalError, match=r"slot 9 .*checksum mismatch"):
        verify_journal(bad, acked_upto=acked)
    # A lost (never written) record in the middle.
    off = record_offset(20, rec, nslots)
    with pytest.raises(JournalError, match=r"records lost: seq 20 missing"):
        verify_journal(image[:off] + bytes(rec) + image[off + rec :], acked_upto=acked)
    # The newest acknowledged record damaged.
    last = report.last_seq
    bad = _flip(image, record_offset(last, rec, nslots) + rec - 100)
    with pytest.raises(JournalError):
        verify_journal(bad, acked_upto=last)
    # An ACK the disk does not have.
    with pytest.raises(JournalError, match=rf"acknowledged seq {last + 3} is not on disk"):
        verify_journal(image, acked_upto=last + 3)
    # The header block damaged.
    with pytest.raises(JournalError, match="header"):
        verify_journal(_flip(image, 20))
    # A half-written record after the newest one is an unacknowledged torn tail: allowed.
    off = record_offset(last + 1, rec, nslots)
    half = encode_record(int(boot_id, 16), last + 1, rec, nslots)[: rec // 2]
    torn = image[:off] + half + image[off + len(half) :]
    assert verify_journal(torn, acked_upto=acked).torn_tail
    with pytest.raises(JournalError):
        verify_journal(torn, acked_upto=last + 1)
    # ... but not anywhere else.
    off = record_offset(5, rec, nslots)
    with pytest.raises(JournalError, match="slot 4"):
        verify_journal(image[:off] + half + image[off + len(half) :])
    # The wrong boot.
    with pytest.raises(JournalError, match="expected"):
        verify_journal(image, expect_boot_id="0123456789abcdef")


@pytest.mark.e2e
def test_disk_journal_qcow2(vm_factory, tmp_path):
    disk = make_disk(tmp_path / "journal.qcow2", "64M", "qcow2")
    vm = vm_factory(disks=[Disk(disk, "qcow2")], cmdline={"hb_ms": 200, "disk_rate": 40, "disk_rec": 8192})
    vm.wait_acks(30, timeout=40)
    vm.kill()
    acked = vm.serial().max_ack
    report = verify_journal(disk, "qcow2", acked_upto=acked)
    assert report.rec_size == 8192 and report.first_seq == 1 and report.last_seq >= acked
    with pytest.raises(JournalError, match="header magic"):
        verify_journal(disk, "raw", acked_upto=acked)  # the qcow2 container read as raw is not a journal
    assert "JOURNAL" in vm.serial().journal[0]


@pytest.mark.e2e
def test_disk_journal_wraps_around(vm_factory, tmp_path):
    disk = make_disk(tmp_path / "small.raw", 4096 + 64 * 4096, "raw")  # header + 64 slots
    vm = vm_factory(
        disks=[Disk(disk, "raw", node_name="jdisk", serial="journal-1")], cmdline={"disk_rate": 100}
    )
    vm.wait_acks(150, timeout=40)
    vm.kill()
    acked = vm.serial().max_ack
    report = verify_journal(disk, acked_upto=acked)
    assert report.wrapped and report.nslots == 64
    assert report.last_seq - report.first_seq + 1 == report.records
    assert report.records >= 63 and report.last_seq >= acked


# --------------------------------------------------------------------------- host-side checker only


def _journal(boot: int, seqs: range, nslots: int, rec: int = 512) -> bytearray:
    img = bytearray(HEADER_SIZE + nslots * rec)
    img[:HEADER_SIZE] = encode_header(boot, rec, nslots, len(img))
    for seq in seqs:
        off = record_offset(seq, rec, nslots)
        img[off : off + rec] = encode_record(boot, seq, rec, nslots)
    return img


def test_journal_checker_synthetic_wrap_and_stale_boot():
    img = _journal(0xABC, range(1, 26), nslots=10)
    rep = verify_journal(bytes(img), acked_upto=25)
    assert (rep.first_seq, rep.last_seq, rep.records, rep.wrapped) == (16, 25, 10, True)
    # A reboot that wrote 3 records over an older boot's journal: the rest is stale, not an error.
    old = _journal(0x111, range(1, 9), nslots=10)
    new = _journal(0x222, range(1, 4), nslots=10)
    mixed = bytes(new[: record_offset(4, 512, 10)]) + bytes(old[record_offset(4, 512, 10) :])
    rep = verify_journal(mixed, acked_upto=3)
    assert (rep.records, rep.stale_records, rep.boot_id) == (3, 5, f"{0x222:016x}")
    # Stale record where a current one belongs = lost record.
    off = record_offset(2, 512, 10)
    mixed2 = mixed[:off] + bytes(old[off : off + 512]) + mixed[off + 512 :]
    with pytest.raises(JournalError, match="seq 2 missing"):
        verify_journal(mixed2, acked_upto=3)
    with pytest.raises(JournalError, match="never written"):
        verify_journal(bytes(HEADER_SIZE + 10 * 512))


def test_parse_serial_tolerates_noise():
    text = (
        "[    0.1] booting\r\nDPAGENT 00000000000000aa hb_ms=100\r\nHB 1 00000000000000aa 10\r\n"
        "ACK 1\r\n[ 2.0] kernel: something\r\nHB 2 00000000000000aa 110\r\nERR disk: nope\r\n"
        "DIRTY 1048576 1024\r\nACK 2\r\nHB 3 00000000000000aa 2"
    )
    log = parse_serial(text)
    assert [hb.counter for hb in log.heartbeats] == [1, 2]  # the last line is incomplete
    assert log.acks == [1, 2] and log.max_ack == 2
    assert log.errors == ["ERR disk: nope"] and log.dirty == [(1048576, 1024)]
    assert log.boot_ids == ["00000000000000aa"]
