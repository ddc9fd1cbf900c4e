"""``dataplane certs``: the certificates of the channel's mutual TLS."""

from __future__ import annotations

import argparse
from pathlib import Path

from dataplane.cli.common import EXIT_OK, CommandFailed, Commands, UsageError, add_command, positive_int

__all__ = ["register_certs"]


def register_certs(commands: Commands) -> None:
    """The ``certs`` group: ``certs init``."""
    group = add_command(
        commands,
        "certs",
        help="create the certificates for the mutually authenticated channel",
        description=(
            "Certificates for the channel's mutual TLS 1.3: a CA (or one CA per cluster) and the\n"
            "listener (server) and dialer (client) identities. See docs/security.md."
        ),
        examples=[
            ("dataplane certs init ./pki", "one CA, default names"),
            ("dataplane certs init ./pki --two-cas", "one CA per cluster, cross-trusted"),
        ],
    )
    actions = group.add_subparsers(title="commands", dest="certs_command", metavar="COMMAND", required=True)
    init = add_command(
        actions,
        "init",
        help="create a CA and the server and client certificates in a directory",
        description=(
            "Create a CA (ECDSA P-256) and two identities signed by it in DIR: the server (the\n"
            "channel listener, destination cluster; EKU serverAuth) and the client (the dialer,\n"
            "source cluster; EKU clientAuth), each with the trust bundle it must pin for its peer.\n"
            "With --two-cas, cluster-a's CA signs the client and cluster-b's CA the server, and each\n"
            "side trusts only the other cluster's CA. Names that parse as IP addresses become IP\n"
            "SANs, others DNS SANs; the first name of each side is also its CN. Private keys are\n"
            "written with mode 0600. Existing files are never overwritten without --force.\n"
            "DIR/manifest.json and DIR/README.txt say which file is what."
        ),
        examples=[
            ("dataplane certs init ./pki", "server 'dataplane-server', client 'dataplane-client'"),
            (
                "dataplane certs init ./pki --server-name dp.cluster-b.example --server-name 10.0.0.7 "
                "--client-name dp.cluster-a.example",
                "your own names (DNS and IP)",
            ),
            ("dataplane certs init ./pki --two-cas --days 30", "two cluster CAs, 30-day certificates"),
            ("dataplane certs init ./pki --force", "replace an existing set"),
        ],
    )
    init.add_argument("directory", metavar="DIR", type=Path, help="where to write (created if missing)")
    init.add_argument(
        "--two-cas", action="store_true", help="one CA per cluster, each side trusting the other's"
    )
    init.add_argument(
        "--server-name",
        metavar="NAME",
        action="append",
        dest="server_names",
        help="a name of the server (listener) certificate; repeat for more (default: dataplane-server)",
    )
    init.add_argument(
        "--client-name",
        metavar="NAME",
        action="append",
        dest="client_names",
        help="a name of the client (dialer) certificate; repeat for more (default: dataplane-client)",
    )
    init.add_argument("--ca-name", metavar="NAME", help="name of the single CA (default: dataplane-ca)")
    init.add_argument(
        "--days", metavar="D", type=positive_int, default=365, help="validity in days (default: 365)"
    )
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(handler=_cmd_certs_init)


def _cmd_certs_init(args: argparse.Namespace) -> int:
    from dataplane import certs

    if args.two_cas and args.ca_name is not None:
        raise UsageError("--ca-name names the single CA; with --two-cas the CAs are cluster-a and cluster-b")
    try:
        cs = certs.init_certs(
            args.directory,
            ca_name=args.ca_name or certs.DEFAULT_CA_NAME,
            server_names=args.server_names or certs.DEFAULT_SERVER_NAMES,
            client_names=args.client_names or certs.DEFAULT_CLIENT_NAMES,
            two_cas=args.two_cas,
            days=args.days,
            force=args.force,
        )
    except certs.InvalidNameError as exc:
        raise UsageError(str(exc)) from exc
    except certs.CertsExistError as exc:
        names = ", ".join(p.name for p in exc.existing)
        raise CommandFailed(
            f"{args.directory}: refusing to overwrite existing files ({names}); use --force to replace them"
        ) from exc
    except certs.CertsError as exc:
        raise CommandFailed(str(exc)) from exc
    files = cs.files()
    kind = "two cross-trusted CAs (cluster-a, cluster-b)" if cs.two_cas else f"one CA '{cs.cas[0].name}'"
    print(f"created {len(files)} files in {cs.directory} ({kind}, valid {cs.days} days):")
    width = max(len(p.name) for p, _ in files)
    for path, what in files:
        print(f"  {path.name:<{width}}  {what}")
    for ident, peer, where in ((cs.server, cs.client, "listener"), (cs.client, cs.server, "dialer")):
        print(
            f"{ident.role} ({where}): {ident.cert.name} + {ident.key.name}, pins {ident.trust.name}, "
            f"expects peer name {peer.names[0]}; sha256 {ident.fingerprint}"
        )
    return EXIT_OK
