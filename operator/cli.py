"""``embedjob operator`` and ``embedjob dev up|down|status``, registered into the main CLI by
:func:`add_commands`. Cheap to import: kopf and the dev stack load only when a command runs."""

from __future__ import annotations

import argparse
import os
import sys


def _cmd_operator(args: argparse.Namespace) -> int:
    """Run the kopf operator (standalone: one replica; the chart runs one)."""
    import asyncio
    import logging

    import kopf

    import embedjob.operator.handlers  # noqa: F401 - registers the handlers

    logging.basicConfig(level=getattr(logging, args.loglevel.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
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


def _cmd_dev_up(args: argparse.Namespace) -> int:
    from embedjob.operator.devstack import DevStack

    stack = DevStack(args.dir)
    if stack.running():
        print(f"dev stack already running in {stack.dir}; `embedjob dev down` first", file=sys.stderr)
        print(stack.describe())
        return 1
    try:
        stack.up(workers=args.workers, operator=not args.no_operator)
    except Exception as e:  # noqa: BLE001 - report, and leave nothing running behind
        print(f"error: dev stack failed to start: {type(e).__name__}: {e}", file=sys.stderr)
        stack.down()
        return 1
    print(stack.describe())
    return 0


def _cmd_dev_down(args: argparse.Namespace) -> int:
    from embedjob.operator.devstack import DevStack

    stopped = DevStack(args.dir).down()
    print(f"stopped {stopped} process(es)")
    return 0


def _cmd_dev_status(args: argparse.Namespace) -> int:
    from embedjob.operator.devstack import DevStack

    stack = DevStack(args.dir)
    print(stack.describe())
    return 0 if stack.running() else 1


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``operator`` and ``dev`` on the main CLI's subparsers."""
    o = subparsers.add_parser("operator", help="run the Kubernetes operator (kubeconfig or in-cluster)")
    o.add_argument("--namespace", "-n", action="append", help="watch only this namespace (repeatable); default all")
    o.add_argument("--liveness", default=os.environ.get("EMBEDJOB_LIVENESS", "http://0.0.0.0:8080/healthz"),
                   help="liveness endpoint URL ('' to disable)")
    o.add_argument("--loglevel", default=os.environ.get("EMBEDJOB_LOGLEVEL", "info"))
    o.set_defaults(func=_cmd_operator)

    d = subparsers.add_parser("dev", help="a local stack: apiserver, Redis, SeaweedFS, operator, workers")
    dsub = d.add_subparsers(dest="dev_command", required=True)
    default_dir = os.environ.get("EMBEDJOB_DEV_DIR", ".dev")
    up = dsub.add_parser("up", help="start etcd, kube-apiserver, Redis, SeaweedFS, the CRD, operator, workers")
    up.add_argument("--dir", default=default_dir, help="state folder (default .dev)")
    up.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    up.add_argument("--no-operator", action="store_true", help="do not start the operator (run your own)")
    up.set_defaults(func=_cmd_dev_up)
    down = dsub.add_parser("down", help="stop everything `dev up` started")
    down.add_argument("--dir", default=default_dir)
    down.set_defaults(func=_cmd_dev_down)
    status = dsub.add_parser("status", help="show what runs and the env to use")
    status.add_argument("--dir", default=default_dir)
    status.set_defaults(func=_cmd_dev_status)
