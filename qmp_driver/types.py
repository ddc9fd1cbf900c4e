"""Typed views of QMP results.

Each dataclass keeps QEMU's original dictionary in ``raw`` so that fields this
driver does not model are still reachable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _d(raw: Any) -> dict[str, Any]:
    return dict(raw) if isinstance(raw, dict) else {}


@dataclass(frozen=True)
class VersionInfo:
    major: int
    minor: int
    micro: int
    package: str = ""

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"

    def at_least(self, major: int, minor: int = 0, micro: int = 0) -> bool:
        return (self.major, self.minor, self.micro) >= (major, minor, micro)

    @classmethod
    def from_qmp(cls, raw: dict[str, Any]) -> VersionInfo:
        q = _d(raw.get("qemu"))
        return cls(int(q.get("major", 0)), int(q.get("minor", 0)), int(q.get("micro", 0)),
                   str(raw.get("package", "")).strip())


@dataclass(frozen=True)
class StatusInfo:
    """``query-status``: ``status`` is e.g. running, paused, inmigrate, postmigrate."""

    status: str
    running: bool
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_qmp(cls, raw: dict[str, Any]) -> StatusInfo:
        return cls(str(raw.get("status", "")), bool(raw.get("running")), _d(raw))


@dataclass(frozen=True)
class BlockNode:
    """One entry of ``query-named-block-nodes``."""

    node_name: str
    driver: str
    filename: str
    read_only: bool
    virtual_size: int
    dirty_bitmaps: list[dict[str, Any]]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_qmp(cls, raw: dict[str, Any]) -> BlockNode:
        image = _d(raw.get("image"))
        return cls(str(raw.get("node-name", "")), str(raw.get("drv", "")), str(raw.get("file", "")),
                   bool(raw.get("ro")), int(image.get("virtual-size", 0)),
                   list(raw.get("dirty-bitmaps") or []), _d(raw))


@dataclass(frozen=True)
class BlockDevice:
    """One entry of ``query-block``: a guest device and the node inserted in it."""

    device: str
    qdev: str
    node_name: str | None
    read_only: bool
    removable: bool
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_qmp(cls, raw: dict[str, Any]) -> BlockDevice:
        ins = raw.get("inserted")
        ins_d = _d(ins)
        return cls(str(raw.get("device", "")), str(raw.get("qdev", "")),
                   ins_d.get("node-name") if ins else None, bool(ins_d.get("ro")),
                   bool(raw.get("removable")), _d(raw))


@dataclass(frozen=True)
class BlockJob:
    """One entry of ``query-block-jobs``."""

    device: str  # the job ID
    type: str
    length: int
    offset: int
    ready: bool
    status: str
    speed: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_qmp(cls, raw: dict[str, Any]) -> BlockJob:
        return cls(str(raw.get("device", "")), str(raw.get("type", "")), int(raw.get("len", 0)),
                   int(raw.get("offset", 0)), bool(raw.get("ready")), str(raw.get("status", "")),
                   int(raw.get("speed", 0)), _d(raw))


@dataclass(frozen=True)
class JobInfo:
    """One entry of ``query-jobs``."""

    id: str
    type: str
    status: str
    current_progress: int
    total_progress: int
    error: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_qmp(cls, raw: dict[str, Any]) -> JobInfo:
        return cls(str(raw.get("id", "")), str(raw.get("type", "")), str(raw.get("status", "")),
                   int(raw.get("current-progress", 0)), int(raw.get("total-progress", 0)),
                   raw.get("error"), _d(raw))


@dataclass(frozen=True)
class RamStats:
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    duplicate: int = 0
    normal: int = 0
    normal_bytes: int = 0
    dirty_pages_rate: int = 0
    mbps: float = 0.0
    dirty_sync_count: int = 0
    postcopy_requests: int = 0
    multifd_bytes: int = 0

    @classmethod
    def from_qmp(cls, raw: Any) -> RamStats:
        r = _d(raw)
        return cls(int(r.get("transferred", 0)), int(r.get("remaining", 0)), int(r.get("total", 0)),
                   int(r.get("duplicate", 0)), int(r.get("normal", 0)), int(r.get("normal-bytes", 0)),
                   int(r.get("dirty-pages-rate", 0)), float(r.get("mbps", 0.0)),
                   int(r.get("dirty-sync-count", 0)), int(r.get("postcopy-requests", 0)),
                   int(r.get("multifd-bytes", 0)))


@dataclass(frozen=True)
class MigrationInfo:
    """``query-migrate``. ``status`` is absent (``"none"``) before any migration."""

    status: str
    total_time_ms: int | None
    downtime_ms: int | None
    expected_downtime_ms: int | None
    setup_time_ms: int | None
    ram: RamStats
    cpu_throttle_percentage: int
    error_desc: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_qmp(cls, raw: dict[str, Any]) -> MigrationInfo:
        def opt(k: str) -> int | None:
            v = raw.get(k)
            return int(v) if v is not None else None

        return cls(str(raw.get("status", "none")), opt("total-time"), opt("downtime"),
                   opt("expected-downtime"), opt("setup-time"), RamStats.from_qmp(raw.get("ram")),
                   int(raw.get("cpu-throttle-percentage", 0)), raw.get("error-desc"), _d(raw))


@dataclass(frozen=True)
class BlockExport:
    id: str
    type: str
    node_name: str
    shutting_down: bool

    @classmethod
    def from_qmp(cls, raw: dict[str, Any]) -> BlockExport:
        return cls(str(raw.get("id", "")), str(raw.get("type", "")), str(raw.get("node-name", "")),
                   bool(raw.get("shutting-down")))
