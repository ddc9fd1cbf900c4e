"""The control stream of a cross-cluster migration: small typed messages, one JSON line each.

Sans-IO: :class:`ControlDecoder` turns received bytes into messages and
:func:`encode` turns a message into bytes; the asyncio side lives in
:mod:`dataplane.migration.cclm`. Each message is a frozen dataclass
(:class:`Hello`, :class:`Ready`, :class:`Refused`, :class:`Abort`,
:class:`Commit`, :class:`Done`); on the wire it is a JSON object with a ``type`` member and its
fields, terminated by ``\\n``. A line longer than :data:`MAX_LINE` bytes, a
line that is not a JSON object, an unknown ``type``, or a field missing or of
the wrong type ends the conversation with :class:`ControlError` (the peer is
not speaking this protocol). Members this version does not know are ignored
(a newer peer may add some).

Messages (``→`` source to destination, ``←`` destination to source):

========== ==== =====================================================================
type       dir  members
========== ==== =====================================================================
hello      →    ``version`` (:data:`CONTROL_VERSION`), ``plan`` (the plan's dict)
ready      ←    the destination validated the plan and is waiting (NBD exports,
                ``migrate-incoming``); ``multifd`` / ``postcopy`` as it set them
refused    ←    ``reason``: the plan cannot be received; nothing was changed
abort      ↔    ``reason``: the sender gave up and will not run the guest. From the source:
                only before ``commit``. From the destination: only before it resumed;
                it promises never to resume (a source that committed may then resume)
commit     →    ``status`` (``completed`` or ``postcopy-active``): the source QEMU handed
                the guest over and stays stopped; the destination may resume it
done       ←    ``status`` (``running`` or ``paused``): the destination took over
                (only after ``commit``)
state      ↔    ``dataplane resolve`` (stream ``cclm-resolve``): ``role``, ``status``
                (QEMU run state), ``migration`` (QEMU migration status)
agree      ↔    ``dataplane resolve``: the side that stays stopped confirms ``action``
========== ==== =====================================================================

The switchover is a commit: the destination resumes only when its own QEMU
completed *and* the source's ``commit`` arrived; the source sends ``commit``
only once its QEMU completed (or entered postcopy) and never resumes after
it unless the destination answers ``abort``. See docs/migration.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from .errors import ControlError

CONTROL_VERSION = 2  # 2: the committed switchover (commit before done)
#: Longest accepted message line in bytes (a plan with hundreds of disks fits easily).
MAX_LINE = 1 << 20
#: Stream names used on the channel.
CONTROL_STREAM = "cclm-control"


def control_stream_name(receiver: str | None = None) -> str:
    """The name of a migration's control stream: ``cclm-control``, or ``cclm-control@RECEIVER``
    to name the receiver of a daemon's shared listener that must take the session."""
    return CONTROL_STREAM if not receiver else f"{CONTROL_STREAM}@{receiver}"


def named_receiver(stream_name: str) -> str | None:
    """The receiver a control stream's name names (None: none named); raises ValueError if the
    name is not a control stream's."""
    if stream_name == CONTROL_STREAM:
        return None
    head, sep, receiver = stream_name.partition("@")
    if head != CONTROL_STREAM or not sep or not receiver:
        raise ValueError(f"not a control stream: {stream_name!r}")
    return receiver
NBD_STREAM = "cclm-nbd"
MIGRATION_STREAM = "cclm-migration"
RESOLVE_STREAM = "cclm-resolve"


@dataclass(frozen=True)
class Hello:
    """source → destination: the protocol version and the plan (see :class:`~.plan.MigrationPlan`)."""

    version: int
    plan: dict[str, Any]
    type: ClassVar[str] = "hello"


@dataclass(frozen=True)
class Ready:
    """destination → source: the plan is validated, the exports and ``migrate-incoming`` wait."""

    multifd: int
    postcopy: bool
    type: ClassVar[str] = "ready"


@dataclass(frozen=True)
class Refused:
    """destination → source: the plan cannot be received; nothing was changed."""

    reason: str
    type: ClassVar[str] = "refused"


@dataclass(frozen=True)
class Abort:
    """either way: the sender gave up before the switchover."""

    reason: str
    type: ClassVar[str] = "abort"


@dataclass(frozen=True)
class Commit:
    """source → destination: the source QEMU handed the guest over (``status`` is ``completed`` or
    ``postcopy-active``) and stays stopped; the destination may resume."""

    status: str
    type: ClassVar[str] = "commit"


@dataclass(frozen=True)
class Done:
    """destination → source: the destination took over; ``status`` is ``running`` or ``paused``."""

    status: str
    type: ClassVar[str] = "done"


@dataclass(frozen=True)
class State:
    """``dataplane resolve``, either way: this side's role and its QEMU's run state and migration status."""

    role: str
    status: str
    migration: str
    type: ClassVar[str] = "state"


@dataclass(frozen=True)
class Agree:
    """``dataplane resolve``: the side that stays stopped confirms the ``action`` the other one takes."""

    action: str
    type: ClassVar[str] = "agree"


Message = Hello | Ready | Refused | Abort | Commit | Done | State | Agree
MESSAGE_CLASSES: dict[str, type[Message]] = {
    cls.type: cls for cls in (Hello, Ready, Refused, Abort, Commit, Done, State, Agree)}
MESSAGE_TYPES = frozenset(MESSAGE_CLASSES)
#: What each field must be on the wire (bool is not an int here).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {"version": (int,), "plan": (dict,), "multifd": (int,),
                                             "postcopy": (bool,), "reason": (str,), "status": (str,),
                                             "role": (str,), "migration": (str,), "action": (str,)}


def encode(msg: Message) -> bytes:
    """One message as a line of bytes. Raises ValueError if it is longer than :data:`MAX_LINE`."""
    line = json.dumps({"type": msg.type, **asdict(msg)}, sort_keys=True, separators=(",", ":")).encode()
    if len(line) >= MAX_LINE:
        raise ValueError(f"control message of {len(line)} bytes exceeds {MAX_LINE}")
    return line + b"\n"


def parse(obj: Any) -> Message:
    """The message a decoded JSON value stands for.

    :raises ControlError: not an object with a known ``type``, or a field missing or of the wrong type.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ControlError("control message is not a JSON object with a 'type'")
    cls = MESSAGE_CLASSES.get(obj["type"])
    if cls is None:
        raise ControlError(f"unknown control message type {obj['type']!r}")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in obj:
            raise ControlError(f"control message {cls.type!r} lacks {f.name!r}")
        value, want = obj[f.name], _FIELD_TYPES[f.name]
        if not isinstance(value, want) or (bool not in want and isinstance(value, bool)):
            raise ControlError(f"control message {cls.type!r}: {f.name!r} must be {want[0].__name__}, "
                               f"got {type(value).__name__}")
        values[f.name] = value
    return cls(**values)


class ControlDecoder:
    """Bytes in, messages out. Holds at most :data:`MAX_LINE` bytes of an incomplete line."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Add received bytes; return the complete messages.

        :raises ControlError: a line too long, not JSON, or not a valid message (see :func:`parse`).
        """
        self._buf += data
        out: list[Message] = []
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) >= MAX_LINE:
                    raise ControlError(f"control line longer than {MAX_LINE} bytes")
                return out
            line = bytes(self._buf[:end])
            del self._buf[:end + 1]
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise ControlError(f"control message is not JSON: {exc}") from None
            out.append(parse(obj))

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held."""
        return len(self._buf)
