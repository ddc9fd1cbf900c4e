"""Benchmarks of the streaming channel through its command line (``dataplane tunnel listen|connect``).

Every figure is a ratio against a reference measured in the same run (see
docs/benchmarks.md). A transfer goes from a source process to a sink
process (``benches/channel_harness.py``) through a *relay pair*: our tunnel
(``tunnel connect --expose`` on the source side, ``tunnel listen --forward``
on the sink side) or a reference (two chained socat relays, a stunnel
client/server pair, or nothing). It is timed from the source's first
``send`` to the sink's last ``recv``; the sink's byte count and CRC-32 must
equal the source's (asserted). Loopback comparisons interleave ours and the
reference round by round and keep the best of each (2 shared cores: other
work slows either side); absolute MB/s (10**6 B/s) are printed too.

* ``channel_plain_vs_socat2``: 2 GiB of random bytes, loopback, ``--plaintext``
  vs ``socat -b 262144`` x2. A third contender, the minimal framed relay
  (:class:`~benches.channel_harness.FramedFloor`), is measured in the same
  rounds and printed next to them: the most any relay that frames and
  checksums every byte can reach on the machine at hand. So is, once, socat
  with its default 8 KiB buffer (``socat`` as run without options).
* ``channel_tls_vs_stunnel``: the same with mutual TLS vs stunnel (TLS 1.3,
  mutual auth, certificates from ``init_certs``).
* ``channel_rss_mib``: VmHWM of the two tunnel processes during the 2 GiB
  plaintext relay (the larger, in MiB).
* ``channel_text_over_link`` / ``channel_random_over_link``: the tunnel ends
  in two namespaces joined by a 200 Mbit/s tbf-shaped veth (mTLS, default
  compression); application throughput / link rate.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from benches.channel_harness import (
    SOCAT_BUFFER,
    SOCAT_DEFAULT_BUFFER,
    DataplaneTunnel,
    FramedFloor,
    GiB,
    MiB,
    Place,
    Procs,
    SocatChain,
    StunnelPair,
    Transfer,
    data_file,
    stunnel_binary,
    transfer,
    tunnel_unavailable_reason,
)
from benches.terminal import say

LOOPBACK_SIZE = 2 * GiB
LOOPBACK_ROUNDS = 4
LOOPBACK_BUDGET_S = 110  # no new round once a test has run this long
LINK_RATE = "200mbit"
LINK_TEXT_SIZE = 512 * MiB
LINK_RANDOM_SIZE = 256 * MiB
LINK_DIRECT_SIZE = 128 * MiB
ROOT_NS = Place()

# VmHWM (MiB) of the tunnel ends in every plaintext 2 GiB run of this session, for channel_rss_mib
_PLAIN_HWM_MIB: list[float] = []


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("channel")


@pytest.fixture(scope="module")
def tunnel_cli() -> None:
    reason = tunnel_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def certs(workdir: Path) -> Any:
    from dataplane.certs import init_certs

    return init_certs(workdir / "pki")


@pytest.fixture(scope="module")
def random_data(workdir: Path) -> Path:
    return data_file(workdir, "random", 16 * MiB, seed=2)


@pytest.fixture(scope="module")
def text_data(workdir: Path) -> Path:
    return data_file(workdir, "text", 16 * MiB, seed=1)


@pytest.fixture
def procs(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    logs = workdir / request.node.name
    logs.mkdir(exist_ok=True)
    with Procs(logs) as p:
        yield p


@pytest.fixture(scope="module")
def link() -> Iterator[Any]:
    from dataplane.testing.netns import Link, netns_unavailable_reason

    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with Link(rate=LINK_RATE) as lk:
        yield lk


# --------------------------------------------------------------------------- helpers


def checked(t: Transfer) -> Transfer:
    assert t.intact, f"{t.label}: data differs: {t.integrity()}"
    return t


def interleaved(benchmark: Any, runs: dict[str, Callable[[], Transfer]], bench: str, rounds: int,
                budget_s: float = LOOPBACK_BUDGET_S) -> dict[str, list[Transfer]]:
    """Run each of *runs* once per round, in turn; the first run of *bench* goes through ``benchmark``.

    Stops starting rounds after *budget_s* seconds (at least one round).
    """
    out: dict[str, list[Transfer]] = {name: [] for name in runs}
    t0 = time.monotonic()
    for rnd in range(rounds):
        if rnd and time.monotonic() - t0 > budget_s:
            break
        order = list(runs) if rnd % 2 == 0 else list(reversed(runs))  # alternate who goes first
        for name in order:
            fn = runs[name]
            if rnd == 0 and name == bench:
                t = benchmark.pedantic(fn, rounds=1, iterations=1)
            else:
                t = fn()
            out[name].append(checked(t))
    return out


def best(ts: list[Transfer]) -> Transfer:
    return max(ts, key=lambda t: t.mb_per_s)


def figures(ts: list[Transfer]) -> str:
    speeds = [t.mb_per_s for t in ts]
    return (f"best {max(speeds):7.1f} MB/s, median {statistics.median(speeds):7.1f} MB/s "
            f"({', '.join(f'{s:.0f}' for s in speeds)})")


def cpu_line(t: Transfer) -> str:
    """CPU used during the best run, in cores (of 2): source, sink and each relay end."""
    cores = {"source": t.source_cpu, "sink": t.sink_cpu, **t.relay_cpu}
    return f"{t.label} CPU (cores): " + ", ".join(f"{k} {v / t.seconds:.2f}" for k, v in cores.items())


_STAT_KEYS = ("bytes_sent", "wire_bytes_sent", "frames_sent", "compressed_frames", "zero_pages",
              "bytes_received", "wire_bytes_received", "compression_ratio", "connections_opened",
              "reconnects", "send_buffered_peak", "recv_buffered_peak")


def tunnel_stats_line(t: Transfer) -> str:
    """The non-zero counters of each end's last session, from its ``--stats-json``."""
    parts = []
    for role, doc in (t.info.get("stats") or {}).items():
        sessions = doc.get("sessions") if isinstance(doc, dict) else None
        if not sessions:
            parts.append(f"{role}: no session")
            continue
        last = sessions[-1]
        vals = [f"{k}={last[k]:g}" for k in _STAT_KEYS
                if isinstance(last.get(k), int | float) and not isinstance(last.get(k), bool) and last[k]]
        parts.append(f"{role}: {', '.join(vals)}")
    return "; ".join(parts) or "no --stats-json written"


def hwm_line(t: Transfer) -> str:
    return ", ".join(f"{name} VmHWM {kib / 1024:.1f} MiB "
                     f"(sampled VmRSS peak {t.rss_peak_kib.get(name, 0) / 1024:.1f})"
                     for name, kib in t.hwm_kib.items())


# --------------------------------------------------------------------------- loopback


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")
def test_channel_plain_vs_socat2(benchmark, ratio, procs, random_data, tunnel_cli, capsys):
    def socat() -> Transfer:
        return transfer(procs, SocatChain(procs, ROOT_NS, ROOT_NS), random_data, LOOPBACK_SIZE,
                        src=ROOT_NS, dst=ROOT_NS)

    def ours() -> Transfer:
        return transfer(procs, DataplaneTunnel(procs, ROOT_NS, ROOT_NS, certs=None), random_data,
                        LOOPBACK_SIZE, src=ROOT_NS, dst=ROOT_NS)

    def floor() -> Transfer:
        return transfer(procs, FramedFloor(procs, ROOT_NS, ROOT_NS), random_data, LOOPBACK_SIZE,
                        src=ROOT_NS, dst=ROOT_NS)

    res = interleaved(benchmark, {"socat": socat, "ours": ours, "floor": floor}, "ours", LOOPBACK_ROUNDS)
    _PLAIN_HWM_MIB.extend(t.max_hwm_mib() for t in res["ours"])
    b_ours, b_ref, b_floor = best(res["ours"]), best(res["socat"]), best(res["floor"])
    floor_ratio = b_floor.mb_per_s / b_ref.mb_per_s
    plain_socat = transfer(procs, SocatChain(procs, ROOT_NS, ROOT_NS, buffer=SOCAT_DEFAULT_BUFFER),
                           random_data, LOOPBACK_SIZE, src=ROOT_NS, dst=ROOT_NS)
    say(capsys,
        f"2 GiB random, loopback: {b_ours.label}: {figures(res['ours'])}",
        f"2 GiB random, loopback: {b_ref.label}: {figures(res['socat'])}",
        f"2 GiB random, loopback: {b_floor.label}: {figures(res['floor'])}",
        cpu_line(b_ours), cpu_line(b_ref), cpu_line(b_floor),
        f"minimal framed relay / socat x2 = {floor_ratio:.3f}; ours / minimal framed relay = "
        f"{b_ours.mb_per_s / b_floor.mb_per_s:.3f}",
        f"2 GiB random, loopback: socat x2 with its default -b {SOCAT_DEFAULT_BUFFER}: "
        f"{plain_socat.mb_per_s:.1f} MB/s; ours (best) / that = {b_ours.mb_per_s / plain_socat.mb_per_s:.3f}",
        f"tunnel: {hwm_line(b_ours)}", f"tunnel stats: {tunnel_stats_line(b_ours)}")
    ratio("channel_plain_vs_socat2", b_ours.mb_per_s / b_ref.mb_per_s, ">=1.0",
          note=f"ours {b_ours.mb_per_s:.0f} MB/s vs socat -b {SOCAT_BUFFER} x2 {b_ref.mb_per_s:.0f} MB/s; "
               f"a minimal framed relay {b_floor.mb_per_s:.0f} MB/s ({floor_ratio:.3f} of socat)")


@pytest.mark.skipif(stunnel_binary() is None, reason="stunnel is not installed")
def test_channel_tls_vs_stunnel(benchmark, ratio, procs, random_data, certs, tunnel_cli, capsys):
    def stunnel() -> Transfer:
        return transfer(procs, StunnelPair(procs, ROOT_NS, ROOT_NS, certs=certs), random_data,
                        LOOPBACK_SIZE, src=ROOT_NS, dst=ROOT_NS)

    def ours() -> Transfer:
        return transfer(procs, DataplaneTunnel(procs, ROOT_NS, ROOT_NS, certs=certs), random_data,
                        LOOPBACK_SIZE, src=ROOT_NS, dst=ROOT_NS)

    res = interleaved(benchmark, {"stunnel": stunnel, "ours": ours}, "ours", LOOPBACK_ROUNDS)
    b_ours, b_ref = best(res["ours"]), best(res["stunnel"])
    say(capsys,
        f"2 GiB random, loopback: {b_ours.label}: {figures(res['ours'])}",
        f"2 GiB random, loopback: {b_ref.label} ({b_ref.info.get('tls', '?')}): {figures(res['stunnel'])}",
        cpu_line(b_ours), cpu_line(b_ref),
        f"tunnel: {hwm_line(b_ours)}", f"tunnel stats: {tunnel_stats_line(b_ours)}")
    ratio("channel_tls_vs_stunnel", b_ours.mb_per_s / b_ref.mb_per_s, ">=0.8",
          note=f"ours {b_ours.mb_per_s:.0f} MB/s vs stunnel {b_ref.mb_per_s:.0f} MB/s")


def test_channel_rss_mib(benchmark, ratio, procs, random_data, tunnel_cli, capsys):
    def ours() -> Transfer:
        return transfer(procs, DataplaneTunnel(procs, ROOT_NS, ROOT_NS, certs=None), random_data,
                        LOOPBACK_SIZE, src=ROOT_NS, dst=ROOT_NS)

    t = checked(benchmark.pedantic(ours, rounds=1, iterations=1))
    assert len(t.hwm_kib) == 2 and all(t.hwm_kib.values()), f"VmHWM not read: {t.hwm_kib}"
    peaks = [t.max_hwm_mib(), *_PLAIN_HWM_MIB]
    say(capsys, f"2 GiB plaintext relay at {t.mb_per_s:.0f} MB/s: {hwm_line(t)}",
        f"largest VmHWM of a tunnel end over {len(peaks)} plaintext runs: {max(peaks):.1f} MiB")
    ratio("channel_rss_mib", max(peaks), "<=200")


# --------------------------------------------------------------------------- across a shaped link


def _link_run(procs: Procs, link: Any, certs: Any, data: Path, size: int) -> Transfer:
    a, b = Place(link, "a"), Place(link, "b")
    relay = DataplaneTunnel(procs, a, b, mid_host=link.addr_b, certs=certs)
    return transfer(procs, relay, data, size, src=a, dst=b)


def _link_lines(t: Transfer, rate_bps: int) -> list[str]:
    assert t.wire is not None
    wire = t.wire["a"]["tx_bytes"]
    return [
        f"{t.label} over {rate_bps / 1e6:.0f} Mbit/s: {t.mb_per_s:.2f} MB/s of application data "
        f"({t.received / MiB:.0f} MiB in {t.seconds:.1f} s) = "
        f"{t.mb_per_s * 8e6 / rate_bps:.3f} x the link rate",
        f"veth A->B carried {wire / 1e6:.1f} MB ({t.received / wire:.2f} application bytes per wire byte), "
        f"link busy {wire * 8 / t.seconds / rate_bps:.3f} of its rate (veth counters count GSO frames, "
        f"so per-packet headers are mostly not in them)",
        cpu_line(t),
        f"tunnel stats: {tunnel_stats_line(t)}",
    ]


def test_channel_text_over_link(benchmark, ratio, procs, link, certs, text_data, tunnel_cli, capsys):
    t = checked(benchmark.pedantic(_link_run, args=(procs, link, certs, text_data, LINK_TEXT_SIZE),
                                   rounds=1, iterations=1))
    say(capsys, *_link_lines(t, link.rate))
    ratio("channel_text_over_link", t.mb_per_s * 8e6 / link.rate, ">=2.5",
          note=f"{t.mb_per_s:.1f} MB/s over {link.rate / 1e6:.0f} Mbit/s")


def test_channel_random_over_link(benchmark, ratio, procs, link, certs, random_data, tunnel_cli, capsys):
    a, b = Place(link, "a"), Place(link, "b")
    direct = checked(transfer(procs, None, random_data, LINK_DIRECT_SIZE, src=a, dst=b,
                              sink_host=link.addr_b))
    t = checked(benchmark.pedantic(_link_run, args=(procs, link, certs, random_data, LINK_RANDOM_SIZE),
                                   rounds=1, iterations=1))
    say(capsys, *_link_lines(t, link.rate),
        f"reference, plain TCP source -> sink over the same link: {direct.mb_per_s:.2f} MB/s = "
        f"{direct.mb_per_s * 8e6 / link.rate:.3f} x the link rate (TCP/IP headers: the ceiling)")
    ratio("channel_random_over_link", t.mb_per_s * 8e6 / link.rate, ">=0.95",
          note=f"{t.mb_per_s:.1f} MB/s; plain TCP {direct.mb_per_s:.1f} MB/s")
