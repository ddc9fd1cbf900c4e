"""The ``dataplane`` command line (``dataplane = "dataplane.cli:main"``, also ``python -m dataplane``).

One module per command group:

=================  ===========================================================
``main``           the parser, :data:`~dataplane.cli.main.COMMAND_GROUPS`, ``main()``
``common``         errors and exit statuses, argument types, channel options and endpoints
``certs``          ``certs init``
``tunnel``         ``tunnel listen`` / ``tunnel connect``
``migration``      ``migrate`` / ``receive``
=================  ===========================================================

To add a group: write a module with ``def register_<group>(commands: Commands) -> None`` that adds
the group with :func:`~dataplane.cli.common.add_command` and its subcommands below it, each with a
handler ``def _cmd_<group>_<action>(args: argparse.Namespace) -> int`` set through
``parser.set_defaults(handler=...)``, and append it to ``COMMAND_GROUPS`` in ``main``. Every command
gets a help text with examples (``examples=`` of ``add_command``).
"""

from dataplane.cli.main import COMMAND_GROUPS, build_parser, main

__all__ = ["COMMAND_GROUPS", "build_parser", "main"]
