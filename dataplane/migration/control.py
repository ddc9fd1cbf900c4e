"""The control stream of a cross-cluster migration: small JSON messages, one per line.

Sans-IO: :class:`ControlDecoder` turns received bytes into messages and
:func:`encode` turns a message into bytes; the asyncio side lives in
:mod:`dataplane.migration.cclm`. A message is a JSON object with a ``type``
member, terminated by ``\\n``; a line longer than :data:`MAX_LINE` bytes, a
line that is not a JSON object or an unknown ``type`` ends the conversation
with :class:`ControlError` (the peer is not speaking this protocol).

Messages (``→`` source to destination, ``←`` destination to source):

========== ==== =====================================================================
type       dir  members
========== ==== =====================================================================
hello      →    ``version`` (:data:`CONTROL_VERSION`), ``plan`` (the plan's dict)
ready      ←    the destination validated the plan and is waiting (NBD exports,
                ``migrate-incoming``); ``multifd`` / ``postcopy`` as it set them
refused    ←    ``reason``: the plan cannot be received; nothing was changed
abort      ↔    ``reason``: the sender gave up before the switchover
done       ←    ``status`` (``running`` or ``paused``): the destination took over
========== ==== =====================================================================
"""

from __future__ import annotations

import json
from typing import Any

CONTROL_VERSION = 1
#: Longest accepted message line in bytes (a plan with hundreds of disks fits easily).
MAX_LINE = 1 << 20
#: Stream names used on the channel.
CONTROL_STREAM = "cclm-control"
NBD_STREAM = "cclm-nbd"
MIGRATION_STREAM = "cclm-migration"

MESSAGE_TYPES = frozenset({"hello", "ready", "refused", "abort", "done"})


class ControlError(Exception):
    """The control stream carried something that is not this protocol."""


def encode(msg_type: str, **members: Any) -> bytes:
    """One message as a line of bytes. Raises ValueError for an unknown type."""
    if msg_type not in MESSAGE_TYPES:
        raise ValueError(f"unknown control message type {msg_type!r}")
    line = json.dumps({"type": msg_type, **members}, sort_keys=True, separators=(",", ":")).encode()
    if len(line) >= MAX_LINE:
        raise ValueError(f"control message of {len(line)} bytes exceeds {MAX_LINE}")
    return line + b"\n"


class ControlDecoder:
    """Bytes in, messages out. Holds at most :data:`MAX_LINE` bytes of an incomplete line."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[dict[str, Any]]:
        """Add received bytes; return the complete messages.

        :raises ControlError: a line too long, not a JSON object, or of an unknown type.
        """
        self._buf += data
        out: list[dict[str, Any]] = []
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) >= MAX_LINE:
                    raise ControlError(f"control line longer than {MAX_LINE} bytes")
                return out
            line = bytes(self._buf[:end])
            del self._buf[:end + 1]
            out.append(self._parse(line))

    @staticmethod
    def _parse(line: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise ControlError(f"control message is not JSON: {exc}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise ControlError("control message is not a JSON object with a 'type'")
        if msg["type"] not in MESSAGE_TYPES:
            raise ControlError(f"unknown control message type {msg['type']!r}")
        return msg

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held."""
        return len(self._buf)
