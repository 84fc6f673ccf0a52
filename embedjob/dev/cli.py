"""``embedjob dev up|down|status|restart|stop|start``, registered into the main CLI by
:func:`add_commands`. Cheap to import: the stack (boto3, the cluster) loads only when a command runs."""

from __future__ import annotations

import argparse
import os
import sys


def _cmd_up(args: argparse.Namespace) -> int:
    from embedjob.dev.cluster import find_apiserver, find_etcd
    from embedjob.dev.stack import DevStack

    stack = DevStack(args.dir)
    if stack.running():
        print(f"dev stack already running in {stack.dir}; `embedjob dev down` first", file=sys.stderr)
        print(stack.describe())
        return 1
    try:  # before anything starts: say what to install instead of half a stack
        find_etcd()
        find_apiserver()
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        stack.up(workers=args.workers, operator=not args.no_operator, metrics=args.metrics)
    except Exception as e:  # noqa: BLE001 - report, and leave nothing running behind
        print(f"error: dev stack failed to start: {type(e).__name__}: {e}", file=sys.stderr)
        stack.down()
        return 1
    print(stack.describe())
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    from embedjob.dev.stack import DevStack

    stopped = DevStack(args.dir).down(say=lambda line: print(line, flush=True))
    print(f"stopped {stopped} process(es)")
    return 0


def _cmd_upload(args: argparse.Namespace) -> int:
    from embedjob.dev.stack import DevStack, StackError
    from embedjob.spec import DNS_NAME

    if not DNS_NAME.match(args.name):
        print(f"error: --name must be a DNS-1123 name (it names the job), got {args.name!r}", file=sys.stderr)
        return 2
    stack = DevStack(args.dir)
    try:
        count, job = stack.upload(args.path, args.name)
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"uploaded {count} shard(s) to s3://datasets/{args.name}/")
    print(f"job file: {job} (output s3://embeddings/{args.name}/)")
    print(f"next:     kubectl apply -f {job} && kubectl get ej {args.name} -w")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from embedjob.dev.stack import DevStack

    stack = DevStack(args.dir)
    print(stack.describe())
    return 0 if stack.running() else 1


def _cmd_component(args: argparse.Namespace) -> int:
    """stop / start / restart of the named components, in the order given."""
    from embedjob.dev.stack import DevStack, StackError

    stack = DevStack(args.dir)
    try:
        names = [stack.resolve(n) for n in args.names]
        for name in names:
            if args.dev_command == "stop":
                was = stack.stop(name)
                print(f"{name}: {'stopped' if was else 'was not running'}")
            elif args.dev_command == "start":
                print(f"{name}: started, pid {stack.start(name, timeout=args.timeout)}")
            else:
                print(f"{name}: restarted, pid {stack.restart(name, timeout=args.timeout)}")
    except (StackError, TimeoutError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``dev`` on the main CLI's subparsers."""
    d = subparsers.add_parser("dev", help="a local stack: apiserver, Redis, SeaweedFS, operator, workers")
    dsub = d.add_subparsers(dest="dev_command", required=True)
    default_dir = os.environ.get("EMBEDJOB_DEV_DIR", ".dev")

    up = dsub.add_parser("up", help="start etcd, kube-apiserver, Redis, SeaweedFS, the CRD, operator, workers")
    up.add_argument("--dir", default=default_dir, help="state folder (default .dev)")
    up.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    up.add_argument("--no-operator", action="store_true", help="do not start the operator (run your own)")
    up.add_argument("--metrics", action="store_true",
                    help="serve /metrics from every process on its own port (also when EMBEDJOB_METRICS_PORT is set: "
                         "from that port up); the URLs are printed")
    up.set_defaults(func=_cmd_up)

    down = dsub.add_parser("down", help="stop everything `dev up` started")
    down.add_argument("--dir", default=default_dir)
    down.set_defaults(func=_cmd_down)

    upload = dsub.add_parser("upload", help="upload your own .tar shards to the stack's S3 and write a job for them")
    upload.add_argument("path", help="a folder of .tar shards (searched recursively) or one .tar")
    upload.add_argument("--name", default="mine", help="s3://datasets/NAME/, the job's name (default: mine)")
    upload.add_argument("--dir", default=default_dir)
    upload.set_defaults(func=_cmd_upload)

    status = dsub.add_parser("status", help="show the components, their pids and logs, and the env to use")
    status.add_argument("--dir", default=default_dir)
    status.set_defaults(func=_cmd_status)

    for verb, text in (("restart", "stop, then start again on the same ports and data folder"),
                       ("stop", "stop (e.g. take S3 away for a fault drill); `dev start` brings it back"),
                       ("start", "start a stopped component again")):
        c = dsub.add_parser(verb, help=f"{text}: redis, seaweedfs (s3), kube-apiserver (apiserver), etcd, "
                                       "operator, worker-N")
        c.add_argument("names", nargs="+", metavar="NAME")
        c.add_argument("--dir", default=default_dir)
        if verb != "stop":
            c.add_argument("--timeout", type=float, default=60, help="seconds to wait until it is ready (default 60)")
        c.set_defaults(func=_cmd_component)
