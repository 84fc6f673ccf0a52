"""``embedjob operator``, registered into the main CLI by :func:`add_commands`. Cheap to import:
kopf and the handlers load only when the command runs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os


def _cmd_operator(args: argparse.Namespace) -> int:
    """Run the kopf operator (standalone: one replica; the chart runs one)."""
    import kopf

    import embedjob.operator.handlers  # noqa: F401 - registers the handlers
    from embedjob.logs import configure
    from embedjob.settings import load

    configure(getattr(logging, args.loglevel.upper()), load().log_format, force=True)
    namespaces = args.namespace or []
    kopf_kwargs: dict = {"standalone": True, "liveness_endpoint": args.liveness or None}
    if namespaces:
        kopf_kwargs["namespaces"] = namespaces
    else:
        kopf_kwargs["clusterwide"] = True
    try:
        kopf.run(**kopf_kwargs)
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``operator`` on the main CLI's subparsers."""
    o = subparsers.add_parser("operator", help="run the Kubernetes operator (kubeconfig or in-cluster)")
    o.add_argument("--namespace", "-n", action="append", help="watch only this namespace (repeatable); default all")
    o.add_argument("--liveness", default=os.environ.get("EMBEDJOB_LIVENESS", "http://0.0.0.0:8080/healthz"),
                   help="liveness endpoint URL ('' to disable)")
    o.add_argument("--loglevel", default=os.environ.get("EMBEDJOB_LOGLEVEL", "info"))
    o.set_defaults(func=_cmd_operator)
