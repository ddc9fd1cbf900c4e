"""``make demo``: a cross-cluster live migration of a running guest, RAM and disks, through the channel.

What happens, step by step (each step is printed as it happens):

1. the test guest is built (or taken from the cache);
2. two "clusters" are created: the network namespaces cluster-a and
   cluster-b, joined by a veth whose both ends are shaped to ``--rate``
   (tbf, 1 Gbit/s by default), and certificates from two different CAs,
   cross-trusted (cluster-a's CA issues the dialer's certificate and is
   trusted by the listener, cluster-b's CA the other way round);
3. the guest boots in cluster-a with its workload: a heartbeat on the
   serial console, memory rewritten with text-like data at a few MiB/s, a
   self-verifying journal on its journal disk, and a data disk holding a
   mix of text-like, random and zero data; an empty, paused destination
   QEMU waits in cluster-b;
4. ``dataplane receive --paused`` starts in cluster-b and ``dataplane
   migrate`` in cluster-a: mutual TLS 1.3, the disks mirrored over NBD and
   RAM migrated, both through one channel session across the veth; its
   progress events are shown live;
5. at the switchover the source is frozen and the destination left paused:
   every disk is compared with the source's, then the destination is
   resumed (``cont``) and its heartbeat and journal are checked.

The report gives the total time, the downtime (as the guest felt it, from
QEMU's STOP/MIGRATION events, and QEMU's own figure), RAM and disk bytes raw
and on the wire, the veth bytes, the compression ratio, the zero pages
elided, the policy's decisions and the verification results. The exit status
is 0 only if the migration completed and every verification passed.

Without root (or without network namespaces), or with ``--loopback``, both
clusters are this machine's own network namespace: everything runs here,
``dataplane receive`` listens on 127.0.0.1, nothing limits the rate, and the
wire bytes are the channel's own figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from dataplane.progress import progress_line, terminal_width
from dataplane.units import format_bytes, format_link_rate

MiB = 1 << 20

__all__ = ["Progress", "main", "run"]


class Out:
    """Thread-safe printing of step lines, with a redrawn progress line on a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty()
        self.lock = threading.Lock()
        self.bar_shown = False
        self.t0 = time.monotonic()

    def line(self, text: str = "") -> None:
        """Print one line (clearing a progress bar first on a terminal)."""
        with self.lock:
            if self.bar_shown:
                self.stream.write("\r\033[K")
                self.bar_shown = False
            self.stream.write(text + "\n")
            self.stream.flush()

    def step(self, text: str) -> None:
        """A step line, stamped with the seconds since the demo started."""
        self.line(f"[{time.monotonic() - self.t0:6.1f}s] {text}")

    def bar(self, text: str) -> None:
        """Redraw the progress line in place (terminal) or print it as a line (otherwise)."""
        if not self.tty:
            self.line(f"          {text}")
            return
        with self.lock:
            self.stream.write("\r\033[K          " + text)
            self.stream.flush()
            self.bar_shown = True


class Progress:
    """Shows ``dataplane migrate --output json`` events: phase changes, decisions, and the progress.

    Progress is a bar redrawn in place on a terminal, otherwise a line at most
    every *every* seconds (and at every phase change). Called from the
    migrate process's reader thread.
    """

    def __init__(self, out: Out, every: float = 1.0) -> None:
        self.out = out
        self.every = every
        self.phase: str | None = None
        self.last = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "phase":
            what = event.get("phase")
            extra = ""
            if what == "plan":
                disks = ", ".join(f"{d.get('node_name')} {format_bytes(int(d.get('size') or 0))}"
                                  for d in event.get("disks") or [])
                extra = f": RAM {format_bytes(int(event.get('memory_size') or 0))}, disks {disks}"
            self.out.step(f"migrate: {what}{extra}")
        elif kind == "decision":
            self.out.step(f"migrate: policy decision: {event.get('action')}: {event.get('reason')}")
        elif kind == "progress":
            self._progress(event)

    def _progress(self, e: dict[str, Any]) -> None:
        phase = str(e.get("phase"))
        changed = phase != self.phase
        if changed:
            self.phase = phase
            self.out.step(f"migrate: phase {phase}")
        now = time.monotonic()
        if not (self.out.tty or changed or now - self.last >= self.every):
            return
        text = progress_line(e, (terminal_width() if self.out.tty else 100) - 11)  # after the indent
        if text is None:
            return  # RAM migration not started yet: nothing new to show
        self.last = now
        self.out.bar(text)


# --------------------------------------------------------------------------- the demo


def _mode(args: argparse.Namespace) -> tuple[bool, str]:
    """(loopback?, why) for this run."""
    from dataplane.testing.netns import netns_unavailable_reason

    if args.loopback:
        return True, "--loopback was given"
    if os.geteuid() != 0:
        return True, "not root: network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN"
    reason = netns_unavailable_reason()
    if reason is not None:
        return True, reason
    return False, ""


def _recipe(args: argparse.Namespace) -> Any:
    from dataplane.testing.cclm import DiskLayout, GuestRecipe

    data = min(args.disk_data, args.disk_size // 2) * MiB
    chunk = 4 * MiB if data >= 32 * MiB else 1 * MiB
    text = data * 55 // 100 // chunk * chunk
    random_ = data * 30 // 100 // chunk * chunk
    zero = max(0, data - text - random_) // chunk * chunk
    layout = DiskLayout(size=args.disk_size * MiB, text=text, random=random_, zero=zero, chunk=chunk)
    return GuestRecipe(memory_mib=args.memory, dirty_mib=min(args.dirty_mib, args.memory // 2),
                       dirty_rate=args.dirty_rate, pattern=args.pattern, journal_mib=16, journal_rate=10,
                       disk=layout)


def _describe_clusters(clusters: Any, out: Out, loopback: bool, why: str) -> None:
    if loopback:
        out.step(f"loopback mode ({why}): cluster-a and cluster-b are both this network namespace, "
                 "receive listens on 127.0.0.1, no rate limit, no veth (wire bytes from the channel)")
    else:
        link = clusters.link
        rate = format_link_rate(link.rate)
        out.step(f"cluster-a = network namespace {link.ns_a} ({link.addr_a}), cluster-b = {link.ns_b} "
                 f"({link.addr_b}); veth {link.dev_a}/{link.dev_b}, both ends shaped to {rate} (tbf)")
    certs = clusters.certs
    cas = ", ".join(ca.name for ca in certs.cas)
    out.step(f"certificates in {clusters.certs_dir}: {len(certs.cas)} CAs ({cas}), cross-trusted")
    for ident, where in ((certs.client, "cluster-a, dials"), (certs.server, "cluster-b, listens")):
        out.line(f"          {ident.role} ({where}): {', '.join(ident.names)}, issued by '{ident.issuer}', "
                 f"trusts {ident.trust.name}; sha256 {ident.fingerprint[:16]}...")


def _figures(run: Any, row: Callable[[str, str], None]) -> None:
    """The measured figures of a migration that reached its end (times, bytes, compression, decisions)."""
    r = run.report
    row("total time", f"{run.total_time:.2f} s (migrate started -> destination's migration completed)")
    if run.switchover_ms is not None:
        row("downtime", f"{run.switchover_ms:.0f} ms as the guest felt it "
                        "(source STOP -> destination ready, QEMU event times)")
    qd = run.qemu_downtime_ms
    row("", f"{qd} ms by QEMU's own figure" if qd is not None else "QEMU's figure: n/a")
    if run.held_s is not None:
        row("", f"(the destination was then held paused {run.held_s:.1f} s to compare the disks; "
                f"STOP -> RESUME incl. that: {(run.downtime_ms or 0) / 1000:.1f} s)")
    for label, key in (("RAM", "ram"), ("disks", "disk"), ("channel total", "")):
        raw, wire = (int(r.get(f"{key}_{x}" if key else f"{x}_bytes") or 0) for x in ("raw", "wire"))
        row(label, f"{format_bytes(raw)} raw, {format_bytes(wire)} on the wire"
            + ("" if key else " (the channel's streams, before TLS)"))
    if run.wire:
        parts = ", ".join(f"{side} tx {format_bytes(w['tx_bytes'])}" for side, w in sorted(run.wire.items()))
        row("veth bytes", f"{format_bytes(run.wire_bytes)} ({parts}; TLS, TCP/IP headers and all)")
    else:
        row("wire bytes", f"{format_bytes(run.wire_bytes)} ({run.wire_source})")
    row("compression ratio", f"{float(r.get('compression_ratio') or 1.0):.2f} (raw / wire)")
    zp = int(r.get("zero_pages") or 0)
    row("zero pages elided", f"{zp} ({format_bytes(zp * 4096)}) by the channel's codec "
                             "(QEMU already sends zero RAM pages as flags)")
    if r.get("reconnects"):
        row("reconnects", str(r["reconnects"]))
    decisions = r.get("decisions") or []
    row("policy decisions", "none" if not decisions else str(len(decisions)))
    for d in decisions:
        row("", f"  at {float(d.get('elapsed') or 0):.1f} s: {d.get('action')}: {d.get('reason')}")


def _report(run: Any, out: Out, loopback: bool, rate: str, ram_checked: bool = True) -> list[str]:
    """Print the report block; return the failed checks (empty: all good).

    ``ram_checked``: the guest runs its RAM checker (it dirties memory), so its verdict is required.
    """
    r = run.report
    failed: list[str] = []
    out.line()
    out.line("=" * 78)
    out.line(f"cross-cluster live migration: {r.get('outcome', 'no report')}"
             + ("" if loopback else f" (cluster-a -> cluster-b over a {rate} veth)"))
    out.line("=" * 78)

    def row(name: str, value: str) -> None:
        out.line(f"  {name:<24} {value}")

    if run.started_at and r:
        _figures(run, row)
    else:  # the migration never got to its end: no figures to show
        row("figures", "none: the migration did not complete")
        if r.get("error"):
            row("migrate says", str(r["error"]))
    out.line("  verification:")
    hb = run.heartbeat
    checks = [
        ("heartbeat", "heartbeat continued on the destination, same boot id"),
        *([("every page", "guest RAM verified")] if ram_checked else []),
        ("journal", "journal verified"),
        ("destination disks identical", "disks identical"),
    ]
    for key, label in checks:
        found = [v for v in run.verified if v.startswith(key)]
        if not found:
            failed.append(label)
            out.line(f"    FAILED  {label}")
            continue
        if key == "heartbeat" and hb:
            jump = hb["destination_first"] - hb["source_last"]
            detail = (f"boot id {hb['boot_id']}; last beat on the source #{hb['source_last']}, "
                      f"first on the destination #{hb['destination_first']} (jump +{jump}), "
                      f"then #{hb['destination_last']}")
        elif key == "every page":
            detail = found[0].removeprefix("every page of the guest's ")
        elif key == "destination disks identical":
            detail = (f"{run.info.get('disks_compared', '')} "
                      "(qemu-img compare, source frozen, destination paused)")
        else:
            detail = found[0]
        out.line(f"    ok      {label}: {detail}")
    out.line("=" * 78)
    return failed


def _tails(workdir: Path, out: Out) -> None:
    """Print the tails of the role logs and QEMU logs of the (last) run under *workdir*."""
    for name in ("migrate.log", "receive.log", "src/qemu.stderr", "dst/qemu.stderr", "dst/serial.log"):
        for path in sorted(workdir.glob(f"scenario/run*/{name}"))[-1:]:
            try:
                lines = path.read_text(errors="replace").splitlines()[-15:]
            except OSError:
                continue
            if lines:
                out.line(f"--- {path.relative_to(workdir)} (last {len(lines)} lines):")
                for ln in lines:
                    out.line(f"    {ln}")


def run(args: argparse.Namespace, out: Out | None = None) -> int:
    """Run the demo with parsed *args*; return the exit status (0: migrated and verified)."""
    from dataplane.testing import guest as guest_mod
    from dataplane.testing.cclm import Clusters, Scenario, cli_has
    from dataplane.units import parse_link_rate

    out = out or Out()
    loopback, why = _mode(args)
    try:
        rate_bps = parse_link_rate(args.rate)
    except ValueError as exc:
        print(f"demo: --rate: {exc}", file=sys.stderr)
        return 2
    out.line("== dataplane demo: cross-cluster live migration of a running guest, RAM and disks ==")
    t_build = time.monotonic()
    try:
        art = guest_mod.build(log=lambda m: out.line(f"          {m}"))
    except guest_mod.GuestBuildError as exc:
        out.line(f"demo FAILED: the test guest cannot be built: {exc}")
        return 1
    out.step(f"test guest ready ({art.kernel_package}) in {time.monotonic() - t_build:.1f} s")
    if not (cli_has("migrate") and cli_has("receive")):
        out.line("demo: `dataplane migrate` / `dataplane receive` are not available")
        return 1
    recipe = _recipe(args)
    workdir = Path(tempfile.mkdtemp(prefix="dp-demo-"))
    status = 1
    try:
        out.step("creating the clusters and the two CAs" + (" (loopback)" if loopback else ""))
        with Clusters(rate_bps, workdir=workdir, loopback=loopback) as clusters, \
                Scenario(clusters, recipe, kernel=art.kernel, initrd=art.initrd, log=out.step) as sc:
            _describe_clusters(clusters, out, loopback, why)
            disk = recipe.disk
            out.step(f"the guest: {recipe.memory_mib} MiB RAM ({recipe.dirty_mib} MiB rewritten at "
                     f"{recipe.dirty_rate} MiB/s, {recipe.pattern}), heartbeat every {recipe.hb_ms} ms, "
                     f"journal disk {recipe.journal_mib} MiB, data disk {disk.size / MiB:.0f} MiB holding "
                     f"{disk.data_bytes / MiB:.0f} MiB")
            result = sc.run("ours", compare_then_resume=True, timeout=args.timeout, on_event=Progress(out))
            failed = _report(result, out, loopback, format_link_rate(rate_bps),
                             ram_checked=recipe.dirty_mib > 0)
            if not result.ok or failed:
                out.line(f"demo FAILED: {result.error or 'verification incomplete: ' + ', '.join(failed)}")
                _tails(workdir, out)
            else:
                status = 0
                out.line(f"demo passed in {time.monotonic() - out.t0:.1f} s")
            if args.json:
                out.line(json.dumps(_as_json(result, loopback, status), default=str))
    except Exception as exc:  # a set-up failure: say what and where, with the logs
        out.line(f"demo FAILED: {type(exc).__name__}: {exc}")
        _tails(workdir, out)
        status = 1
    finally:
        if args.keep:
            out.line(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


def _as_json(result: Any, loopback: bool, status: int) -> dict[str, Any]:
    return {"event": "demo", "ok": status == 0, "loopback": loopback, "total_time": result.total_time,
            "downtime_ms": result.switchover_ms, "downtime_incl_hold_ms": result.downtime_ms,
            "qemu_downtime_ms": result.qemu_downtime_ms, "held_s": result.held_s,
            "wire_bytes": result.wire_bytes, "wire_source": result.wire_source, "wire": result.wire,
            "report": result.report, "verified": result.verified, "error": result.error}


def parser() -> argparse.ArgumentParser:
    """The demo's command line."""
    p = argparse.ArgumentParser(prog="python -m dataplane.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", default="1gbit", help="veth rate limit, tc style (default 1gbit)")
    p.add_argument("--memory", metavar="MIB", type=int, default=256, help="guest RAM in MiB (default 256)")
    p.add_argument("--dirty-mib", metavar="MIB", type=int, default=64,
                   help="guest memory the workload rewrites, MiB (default 64)")
    p.add_argument("--dirty-rate", metavar="MIB_S", type=int, default=4,
                   help="the workload's dirtying rate in MiB/s (default 4)")
    p.add_argument("--pattern", choices=("text", "random", "zero"), default="text",
                   help="what the workload writes to memory (default text)")
    p.add_argument("--disk-size", metavar="MIB", type=int, default=512,
                   help="data disk size in MiB (default 512)")
    p.add_argument("--disk-data", metavar="MIB", type=int, default=150,
                   help="MiB of data on the data disk: 55%% text-like, 30%% random, 15%% zeros (default 150)")
    p.add_argument("--timeout", metavar="SECONDS", type=float, default=300.0,
                   help="give up on the migration after this many seconds (default 300)")
    p.add_argument("--loopback", action="store_true",
                   help="run both clusters in this network namespace on 127.0.0.1, unshaped "
                        "(the default when not root)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, disks, certificates)")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line at the end")
    return p


def main(argv: list[str] | None = None, *, stream: TextIO | None = None) -> int:
    """Entry point: parse *argv* and run the demo, printing to *stream* (default stdout)."""
    args = parser().parse_args(argv)
    for name in ("memory", "disk_size", "dirty_rate"):
        if getattr(args, name) <= 0:
            print(f"demo: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    return run(args, Out(stream))


if __name__ == "__main__":
    raise SystemExit(main())
