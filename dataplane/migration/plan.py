"""What to migrate: the disks (node, size, format, NBD export name), the guest
memory size and the tuning options, as plain data that serialises to JSON (the
plan travels to the destination over a control stream).

::

    plan = await discover_plan(src)                    # every writable guest disk
    wire = plan.to_json()
    plan = MigrationPlan.from_json(wire)               # on the destination
    validate_target(plan, await dst.query_named_block_nodes())   # raises PlanRefused

A disk lands on the destination's node of the same name unless the plan maps it to another one
(``discover_plan(src, disk_map={"vda": "vda-new"})``: new volumes, of any image format, on the
destination). A plan with such a map is version 2, so that a destination too old to read the
map refuses it instead of writing the node of the source's name.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from qmp_driver import BlockDevice, BlockNode, QemuDriver

from .errors import PlanRefused

PLAN_VERSION = 1
#: A plan that maps a disk onto a destination node of another name.
PLAN_VERSION_MAP = 2

COPY_MODES = frozenset({"background", "write-blocking"})
POSTCOPY_MODES = frozenset({"never", "auto"})
#: QEMU's image format drivers: a disk may change between them (the mirror copies guest data).
IMAGE_FORMATS = frozenset({"raw", "qcow2", "qcow", "qed", "vmdk", "vdi", "vhdx", "vpc", "parallels", "luks"})


@dataclass(frozen=True)
class DiskPlan:
    """One disk to migrate.

    ``node_name`` is the format node on the source, and the node of the same
    name on the destination receives it. ``size`` is the guest-visible size
    in bytes, ``format`` the source's format driver (informational: the
    destination may use another format), ``export_name`` the NBD export the
    destination offers for it, ``target_node`` the destination's node that
    receives it when it is not the node of the same name (a node name or a
    device id there; :func:`resolve_targets` makes it a node name).
    """

    node_name: str
    size: int
    format: str
    export_name: str
    target_node: str = ""

    @property
    def dest_node(self) -> str:
        """The destination's node (or device id) that receives this disk."""
        return self.target_node or self.node_name

    def describe(self) -> str:
        """``'vda'``, or ``'vda' -> 'vda-new'`` for a mapped disk (for messages)."""
        if self.dest_node == self.node_name:
            return repr(self.node_name)
        return f"{self.node_name!r} -> {self.dest_node!r}"


@dataclass(frozen=True)
class MigrationOptions:
    """Tuning of one migration. Sizes in bytes, rates in bytes/s, times in seconds
    unless the name says otherwise."""

    # RAM precopy limit. QEMU 7.2 defaults to 128 MiB/s; across clusters the channel owns shaping, so
    # QEMU's own limit is set out of the way.
    max_bandwidth: int = 1 << 34
    downtime_limit_ms: int = 300
    auto_converge: bool = False  # QEMU throttles the vCPUs when dirtying outruns the link
    multifd_channels: int = 0  # 0: one migration stream; N >= 1: multifd with N channels
    postcopy: str = "never"  # "auto": a stalled precopy switches to postcopy (not with multifd)
    stall_window: float = 10.0  # the remaining RAM must shrink by stall_min_shrink over this many s
    stall_min_shrink: float = 0.05
    mirror_speed: int = 0  # per disk; 0 = unlimited
    mirror_granularity: int | None = None
    mirror_buf_size: int | None = None
    mirror_copy_mode: str = "background"  # or "write-blocking" (guest writes wait for the target)
    # The mirror target (the NBD client node) turns all-zero writes into NBD WRITE_ZEROES that may
    # unmap: written zeros cross no socket, and they and the source's holes stay holes on a
    # destination opened with discard=unmap. (libvirt's sequence leaves both off.)
    mirror_detect_zeroes: bool = True
    mirror_timeout: float | None = None  # until every mirror is READY (None: the completion timeout)
    # From `migrate` until pre-switchover. None: timeout_base + timeout_per_gib per GiB of RAM + disks.
    precopy_timeout: float | None = None
    timeout_base: float = 120.0
    timeout_per_gib: float = 120.0
    switchover_timeout: float = 120.0  # from pre-switchover until completed (postcopy: plus the RAM left)
    progress_interval: float = 0.5

    def __post_init__(self) -> None:
        if self.mirror_copy_mode not in COPY_MODES:
            raise ValueError(f"mirror_copy_mode must be one of {sorted(COPY_MODES)}")
        if self.max_bandwidth <= 0 or self.downtime_limit_ms <= 0 or self.mirror_speed < 0:
            raise ValueError("max_bandwidth and downtime_limit_ms must be > 0, mirror_speed >= 0")
        if self.progress_interval <= 0:
            raise ValueError("progress_interval must be > 0")
        if self.postcopy not in POSTCOPY_MODES:
            raise ValueError(f"postcopy must be one of {sorted(POSTCOPY_MODES)}")
        if not 0 <= self.multifd_channels <= 255:
            raise ValueError("multifd_channels must be in 0..255")
        if self.stall_window <= 0 or not 0 < self.stall_min_shrink < 1:
            raise ValueError("stall_window must be > 0 and stall_min_shrink in (0, 1)")


@dataclass(frozen=True)
class MigrationPlan:
    """The disks, the guest memory size (bytes) and the options of one migration."""

    disks: tuple[DiskPlan, ...]
    memory_size: int
    options: MigrationOptions = field(default_factory=MigrationOptions)

    def __post_init__(self) -> None:
        object.__setattr__(self, "disks", tuple(self.disks))
        names = [d.node_name for d in self.disks]
        exports = [d.export_name for d in self.disks]
        if len(set(names)) != len(names) or len(set(exports)) != len(exports):
            raise PlanRefused(f"duplicate disk node or export names in the plan: {names} / {exports}")
        dests = [d.dest_node for d in self.disks]
        if len(set(dests)) != len(dests):
            raise PlanRefused(f"two disks map onto one destination node: {dests}")

    def disk(self, node_name: str) -> DiskPlan:
        """The disk of that node. :raises KeyError: not in the plan."""
        for d in self.disks:
            if d.node_name == node_name:
                return d
        raise KeyError(node_name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible data (with a ``version`` member: 2 when a disk is mapped)."""
        mapped = any(d.dest_node != d.node_name for d in self.disks)
        disks = [asdict(d) if mapped else {k: v for k, v in asdict(d).items() if k != "target_node"}
                 for d in self.disks]
        return {"version": PLAN_VERSION_MAP if mapped else PLAN_VERSION, "memory_size": self.memory_size,
                "disks": disks, "options": asdict(self.options)}

    def to_json(self) -> str:
        """The plan as a JSON document."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MigrationPlan:
        """Inverse of :meth:`to_dict`. Unknown option names are ignored (newer peers).

        :raises PlanRefused: wrong version, missing or mistyped members.
        """
        try:
            if data.get("version") not in (PLAN_VERSION, PLAN_VERSION_MAP):
                raise PlanRefused(f"unsupported plan version {data.get('version')!r} "
                                  f"(this side speaks {PLAN_VERSION} and {PLAN_VERSION_MAP})")
            disks = []
            for d in data["disks"]:
                disk = DiskPlan(str(d["node_name"]), int(d["size"]), str(d["format"]), str(d["export_name"]),
                                str(d.get("target_node") or ""))
                if disk.size <= 0 or not disk.node_name or not disk.export_name:
                    raise PlanRefused(f"malformed disk in plan: {d!r}")
                disks.append(disk)
            known = {f.name for f in fields(MigrationOptions)}
            raw_opts = dict(data.get("options") or {})
            opts = MigrationOptions(**{k: v for k, v in raw_opts.items() if k in known})
            return cls(tuple(disks), int(data["memory_size"]), opts)
        except PlanRefused:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanRefused(f"malformed plan: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> MigrationPlan:
        """Parse :meth:`to_json` output.

        :raises PlanRefused: not JSON, or not a valid plan.
        """
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise PlanRefused(f"malformed plan: not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise PlanRefused("malformed plan: not a JSON object")
        return cls.from_dict(data)


def validate_target(plan: MigrationPlan, target_nodes: Iterable[BlockNode],
                    devices: Iterable[BlockDevice] | None = None, *,
                    allowed: Collection[str] | None = None) -> None:
    """Check that the destination's block nodes can receive every disk of ``plan``.

    Each disk needs a node of the same name (or the node it is mapped to:
    :attr:`DiskPlan.dest_node`) that is the root node of a guest
    device (``devices``, the destination's ``query-block``: a protocol node,
    a backing node or a node no device uses is never written by a migration),
    whose driver is the plan's format (or both are image formats, e.g. a raw
    source into a qcow2 destination: the mirror writes what the guest sees),
    that is writable and exactly as large
    as the source disk (QEMU's mirror refuses targets of another size).
    ``allowed`` (node names or device ids) restricts further which nodes the
    source may write to. ``devices=None`` skips the device check (a caller
    that has no ``query-block``).

    :raises PlanRefused: with every problem found, e.g. a missing node, a
        node that is not a guest disk, another format, a target smaller (or
        larger) than its source, a read-only target, a node not allowed.
    """
    by_name = {n.node_name: n for n in target_nodes}
    roots = None if devices is None else {d.node_name: d for d in devices if d.node_name and d.qdev}
    problems = []
    for d in plan.disks:
        what = f"disk {d.describe()}"
        node = by_name.get(d.dest_node)
        if node is None:
            problems.append(f"{what}: no block node of that name on the destination")
            continue
        dev = None if roots is None else roots.get(d.dest_node)
        if roots is not None and dev is None:
            problems.append(f"{what}: the destination node is not the root node of a guest "
                            f"device (a protocol, backing or unused node is never written by a migration)")
            continue
        names = {d.dest_node, dev.device if dev else "", _qdev_id(dev)}
        if allowed is not None and not names & set(allowed):
            problems.append(f"{what}: not among the disks this destination accepts "
                            f"({', '.join(sorted(allowed))})")
            continue
        if d.format and node.driver != d.format and not {node.driver, d.format} <= IMAGE_FORMATS:
            problems.append(f"{what}: the destination node is {node.driver}, the source "
                            f"disk {d.format} (another image format is fine; a protocol or filter node "
                            f"in place of an image format is not)")
        if node.read_only:
            problems.append(f"{what}: the destination node is read-only")
        if node.virtual_size < d.size:
            problems.append(f"{what}: destination is smaller than the source "
                            f"({node.virtual_size} < {d.size} bytes)")
        elif node.virtual_size > d.size:
            problems.append(f"{what}: destination is larger than the source "
                            f"({node.virtual_size} > {d.size} bytes; QEMU's mirror needs equal sizes)")
    if not plan.disks:
        problems.append("the plan has no disks (use a plain migration for diskless VMs)")
    if problems:
        raise PlanRefused("; ".join(problems))


def resolve_targets(plan: MigrationPlan, target_nodes: Iterable[BlockNode],
                    devices: Iterable[BlockDevice]) -> MigrationPlan:
    """``plan`` with every mapped disk's :attr:`DiskPlan.target_node` made a destination node name:
    a name that is no node there but a guest device's id (or device name) stands for that device's
    root node. Names that match neither are left for :func:`validate_target` to refuse.

    :raises PlanRefused: two disks end up on one node.
    """
    names = {n.node_name for n in target_nodes}
    devs = list(devices)
    disks = []
    for d in plan.disks:
        if d.target_node and d.target_node not in names:
            with contextlib.suppress(PlanRefused):
                dev = find_device(devs, d.target_node)
                d = replace(d, target_node=dev.node_name or d.target_node)
        disks.append(d)
    return replace(plan, disks=tuple(disks))


def _qdev_id(dev: BlockDevice | None) -> str:
    """The id of a device's qdev path (``/machine/peripheral/ID/virtio-backend`` → ``ID``)."""
    if dev is None:
        return ""
    parts = dev.qdev.split("/")
    return parts[3] if len(parts) > 3 and parts[2] == "peripheral" else dev.qdev


def find_device(devices: Iterable[BlockDevice], name: str) -> BlockDevice:
    """The guest block device (from ``query-block``) whose root node name, device id or device name is
    ``name``.

    :raises PlanRefused: there is none (or it has no medium).
    """
    found = next((d for d in devices if d.node_name and (
        name in (d.node_name, d.qdev, d.device) or f"/machine/peripheral/{name}/" in d.qdev)), None)
    if found is None or found.node_name is None:
        raise PlanRefused(f"disk {name!r}: no guest block device with that node name or id")
    return found


async def memory_size(drv: QemuDriver) -> int:
    """The guest's base memory in bytes (``query-memory-size-summary``).

    :raises qmp_driver.DriverError: the query failed.
    """
    return int((await drv.execute("query-memory-size-summary"))["base-memory"])


async def discover_plan(src: QemuDriver, disks: Iterable[str] | None = None,
                        options: MigrationOptions | None = None, *,
                        disk_map: Mapping[str, str] | None = None) -> MigrationPlan:
    """Build a plan from the source's ``query-block`` / ``query-named-block-nodes``.

    ``disks`` names the disks to move by format node name or device (qdev) id;
    by default every writable guest disk with a medium. The export name of a
    disk is its node name. ``disk_map`` maps a disk (node name or device id
    here) onto the destination's node (node name or device id there) that
    receives it instead of the node of the same name; a mapped disk is
    migrated even if ``disks`` does not name it.

    :raises PlanRefused: a named or mapped disk does not exist, is read-only or
        has no medium; no disk found; two disks map onto one destination node.
    :raises qmp_driver.DriverError: a query failed.
    """
    devices = await src.query_block()
    nodes = {n.node_name: n for n in await src.query_named_block_nodes()}
    targets: dict[str, str] = {}
    for name, dest in (disk_map or {}).items():
        found = find_device(devices, name)
        assert found.node_name is not None
        if not dest:
            raise PlanRefused(f"disk {name!r}: an empty destination node in the disk map")
        targets[found.node_name] = dest
    chosen: list[DiskPlan] = []

    def plan_for(node_name: str) -> DiskPlan:
        node = nodes[node_name]
        dest = targets.get(node_name, "")
        return DiskPlan(node_name, node.virtual_size, node.driver, node_name,
                        "" if dest == node_name else dest)

    if disks is None:
        for dev in devices:
            if dev.node_name and not dev.read_only and dev.node_name in nodes:
                chosen.append(plan_for(dev.node_name))
    else:
        for name in disks:
            found = find_device(devices, name)
            if found.read_only:
                raise PlanRefused(f"disk {name!r} is read-only; it is not migrated as a writable disk")
            assert found.node_name is not None
            chosen.append(plan_for(found.node_name))
    for node_name in sorted(targets.keys() - {d.node_name for d in chosen}):
        dev = next(d for d in devices if d.node_name == node_name)
        if dev.read_only or node_name not in nodes:
            raise PlanRefused(f"disk {node_name!r} is read-only; it is not migrated as a writable disk")
        chosen.append(plan_for(node_name))
    if not chosen:
        raise PlanRefused("the source has no writable guest disk to migrate")
    return MigrationPlan(tuple(chosen), await memory_size(src), options or MigrationOptions())
