"""``make demo``: boot the test guest and run the native kernels on its live memory.

The guest's RAM is backed by a shared file in /dev/shm, so the host can map it
while the guest runs. The demo then:

1. scans guest RAM for zero pages,
2. encodes it with the page codec and decodes it back (verified by hash),
3. tracks which pages the guest's workload dirties over a few seconds, as a
   dirty bitmap, and lists the extents,
4. checks that the guest's heartbeat kept going and that its disk journal
   lost no acknowledged write.

Run ``python -m dataplane.demo --help`` for the knobs.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

from dataplane.native import Bitmap, PageEncoder, decode, simd_level, zero_pages
from dataplane.testing import guest as guest_mod
from dataplane.testing.journal import verify_journal
from dataplane.testing.vm import Disk, QemuVM, VMSpec, make_disk

PAGE = 4096
MiB = 1 << 20


def say(msg: str = "") -> None:
    print(msg, flush=True)


def gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / max(seconds, 1e-9) / 1e9:.1f} GB/s"


def changed_pages(mem: mmap.mmap, prev: bytes, npages: int) -> Bitmap:
    """A bitmap (one bit per page) of the pages whose bytes differ from ``prev``.

    (The data plane itself learns dirty pages from QEMU; the demo compares
    snapshots because it watches the guest from outside.)
    """
    bm = Bitmap(npages * PAGE, PAGE)
    for i in range(npages):
        a = i * PAGE
        if mem[a:a + PAGE] != prev[a:a + PAGE]:
            bm.set_bit(i)
    return bm


def run(args: argparse.Namespace) -> int:
    say("== dataplane demo: native kernels on a live guest's memory ==")
    t0 = time.monotonic()
    art = guest_mod.build(log=lambda m: say(f"      {m}"))
    say(f"[1/5] test guest ready ({art.kernel_package}) in {time.monotonic() - t0:.1f} s")

    with tempfile.TemporaryDirectory(prefix="dp-demo-") as tmp, \
            tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="dp-demo-ram-") as ramfile:
        disk = Path(tmp) / "journal.raw"
        make_disk(disk, 64 * MiB, "raw")
        params = {"hb_ms": 100, "dirty_mib": args.dirty_mib, "dirty_rate": args.dirty_rate,
                  "pattern": args.pattern, "disk_rate": 20}
        spec = VMSpec(memory_mib=args.memory, disks=[Disk(str(disk), "raw")], cmdline=params,
                      memory_backend_path=ramfile.name, kernel=art.kernel, initrd=art.initrd)
        say(f"[2/5] booting the guest ({spec.accel}): {args.memory} MiB RAM, heartbeat every 100 ms, "
            f"dirtying {args.dirty_mib} MiB at {args.dirty_rate} MiB/s ({args.pattern}), journal disk 64 MiB")
        with QemuVM(spec, Path(tmp) / "vm") as vm:
            t_boot = time.monotonic()
            beats = vm.wait_heartbeat(count=3, timeout=120)
            say(f"      heartbeat after {time.monotonic() - t_boot:.1f} s: HB {beats[-1].counter} "
                f"boot {beats[-1].boot_id}")
            time.sleep(1.0)  # let the workload fill its buffer
            size = args.memory * MiB
            npages = size // PAGE
            with open(ramfile.name, "rb") as fh:
                mem = mmap.mmap(fh.fileno(), size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                prot=mmap.PROT_READ)

            t = time.perf_counter()
            zmap = zero_pages(mem, PAGE)
            dt = time.perf_counter() - t
            nzero = zmap.count()
            say(f"[3/5] zero-page scan ({simd_level()}): {args.memory} MiB in {dt * 1e3:.1f} ms "
                f"({gbps(size, dt)}): {nzero} of {npages} pages are zero ({100 * nzero / npages:.1f}%)")

            # Encode a frozen snapshot so that decode can be checked byte for byte.
            snap = bytes(mem)
            enc = PageEncoder(PAGE, mode="auto")
            t = time.perf_counter()
            body = enc.encode(snap)
            dt_enc = time.perf_counter() - t
            t = time.perf_counter()
            back = decode(body, size)
            dt_dec = time.perf_counter() - t
            ok = hashlib.sha256(back).digest() == hashlib.sha256(snap).digest()
            st = enc.stats()
            say(f"[4/5] page codec: {args.memory} MiB -> {len(body) / MiB:.1f} MiB "
                f"(x{size / max(len(body), 1):.1f}) encode {gbps(size, dt_enc)}, "
                f"decode {gbps(size, dt_dec)}; zero pages elided {st['zero_pages']}, "
                f"lz4 runs {st['lz4_runs']}, raw runs {st['raw_runs']}; "
                f"round trip {'identical' if ok else 'MISMATCH'}")
            if not ok:
                return 1

            base = bytes(mem)
            t = time.monotonic()
            time.sleep(args.seconds)
            dirty = changed_pages(mem, base, npages)
            dt = time.monotonic() - t
            ext = dirty.to_extents()
            largest = max((n for _, n in ext), default=0)
            dmib = dirty.count() * PAGE / MiB
            say(f"[5/5] dirty tracking over {dt:.1f} s: {dirty.count()} pages ({dmib:.1f} MiB, "
                f"{dmib / dt:.1f} MiB/s; workload set to {args.dirty_rate} MiB/s) in {len(ext)} extents, "
                f"largest {largest / MiB:.2f} MiB; bitmap serialises to {len(dirty.to_bytes())} bytes")
            mem.close()

            last_before = beats[-1].counter
            after = vm.wait_heartbeat(count=1, timeout=30, newer_than=last_before + 5)
            acked = vm.serial().max_ack
            vm.kill()
        boot_ids = {hb.boot_id for hb in vm.heartbeats()}
        report = verify_journal(str(disk), fmt="raw", acked_upto=acked)
        say(f"verified: heartbeat went on (HB {last_before} -> {after[-1].counter}, "
            f"{'one boot' if len(boot_ids) == 1 else 'REBOOTED'}); journal holds records "
            f"{report.first_seq}..{report.last_seq}, every acknowledged write (up to {acked}) present")
    say(f"done in {time.monotonic() - t0:.1f} s")
    return 0 if len(boot_ids) == 1 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dataplane.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", type=int, default=256, help="guest RAM in MiB (default 256)")
    p.add_argument("--dirty-mib", type=int, default=64, help="guest memory the workload rewrites (MiB)")
    p.add_argument("--dirty-rate", type=int, default=20, help="workload dirtying rate in MiB/s")
    p.add_argument("--pattern", choices=("text", "random", "zero"), default="text",
                   help="data the workload writes (default text)")
    p.add_argument("--seconds", type=float, default=1.0, help="dirty-tracking window (default 1 s)")
    args = p.parse_args(argv)
    if not Path("/dev/shm").is_dir() or not os.access("/dev/shm", os.W_OK):
        print("demo: /dev/shm is needed to share guest RAM with the host", file=sys.stderr)
        return 1
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
