"""Cross-cluster live migration: the two roles joined by one channel session.

The source (:func:`run_source`, ``dataplane migrate``) dials the
destination's channel listener (:func:`run_target`, ``dataplane receive``).
Over that one session travel:

* the control stream (:mod:`dataplane.migration.control`): the plan,
  ``ready`` / ``refused``, ``abort`` either way, the source's ``commit``
  and the destination's ``done`` (the switchover is a commit: the
  destination resumes only on its QEMU's completion and ``commit``);
* one NBD stream per disk (QEMU's NBD client on the source connects to a
  local unix socket of the source relay; the destination relay connects the
  stream to the destination QEMU's NBD server);
* the migration stream, then the multifd streams, in the order the source
  QEMU opened them.

QEMU never speaks TCP across clusters: each QEMU only sees local unix
sockets. See ``docs/migration.md`` for the sequence, the policy and what
happens on each failure.

The source's role is :mod:`.cclm_source`, the destination's :mod:`.cclm_target`, what they share
(reports, events) :mod:`.cclm_common`; this module gathers their public names.
"""

from .cclm_common import CclmReport, ChannelFigures, TargetReport, progress_event
from .cclm_source import run_source
from .cclm_target import run_target
from .control_stream import ControlStream

__all__ = ["CclmReport", "ChannelFigures", "ControlStream", "TargetReport", "progress_event", "run_source",
           "run_target"]
