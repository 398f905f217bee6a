"""``asyncllm serve MODEL --replicas N``: N engine replicas on Ray Serve behind one OpenAI-compatible
endpoint (extra ``ray``).

Without ``--ray-address`` a local Ray cluster is started in this process (no dashboard, a small object
store: requests and responses are small) and shut down at exit. With ``--ray-address`` (``auto`` on a node
of a running cluster, or ``ray://head:10001``) the replicas are placed on that cluster; at exit only this
application is deleted. Every node that runs a replica needs asyncllm installed and the model at the same
path (or a hub id it can load).
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from asyncllm.adapters.settings import ServerSettings

APP_NAME = "asyncllm"
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024
"""The object store of a local cluster: it only carries requests and response chunks."""


def add_replica_options(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` options for replicas on Ray."""
    parser.add_argument("--replicas", type=int, default=0, metavar="N",
                        help="serve N engine replicas on Ray Serve with session affinity (needs the 'ray' "
                             "extra); 0 (default): one engine in this process")
    parser.add_argument("--ray-address", default=None, metavar="ADDRESS",
                        help="with --replicas: join this Ray cluster ('auto', 'ray://head:10001'); default: "
                             "start a local one")
    parser.add_argument("--replica-cpus", type=float, default=1.0, metavar="N",
                        help="CPUs each replica reserves, and its torch threads when no thread count is "
                             "given (default 1)")
    parser.add_argument("--replica-gpus", type=float, default=None, metavar="N",
                        help="GPUs each replica reserves (default: 1 when the engine device is CUDA, or auto "
                             "on a machine with a GPU; else 0)")


def check_replica_options(args: argparse.Namespace) -> None:
    """``ValueError`` for replica options that cannot work."""
    if args.replicas < 0:
        raise ValueError(f"--replicas: must be >= 0, got {args.replicas}")
    if args.ray_address is not None and not args.replicas:
        raise ValueError("--ray-address: needs --replicas N")
    if args.replica_cpus < 0 or (args.replica_gpus is not None and args.replica_gpus < 0):
        raise ValueError("--replica-cpus, --replica-gpus: must be >= 0")


def _replica_gpus(args: argparse.Namespace) -> float:
    if args.replica_gpus is not None:
        return float(args.replica_gpus)
    device = str(args.device or "auto")
    if device.startswith("cuda"):
        return 1.0
    if device == "auto":
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
    return 0.0


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _model_location(model: str) -> str:
    """An existing local path made absolute (replica processes do not share this working directory)."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


def run_replicas(args: argparse.Namespace, model: str, settings: ServerSettings,
                 engine_kwargs: dict[str, Any]) -> int:
    """Start (or join) a Ray cluster, deploy ``--replicas`` engine replicas and serve until interrupted."""
    try:
        import ray
        from ray import serve

        from asyncllm.adapters.ray_serve import build_app
    except ImportError as error:
        print(f"asyncllm serve --replicas needs Ray Serve (pip install 'asyncllm[ray]'): {error}", file=sys.stderr)
        return 2
    port = args.port or _free_port(args.host)
    local = args.ray_address is None
    if local:
        ray.init(include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES)
    else:
        ray.init(address=args.ray_address)
    stop = threading.Event()
    interrupted: list[int] = []

    def request_stop(sig: int, frame: object) -> None:
        interrupted.append(sig)
        stop.set()

    try:
        serve.start(http_options={"host": args.host, "port": port})
        print(f"starting {args.replicas} replica(s) of {model} on Ray ...", file=sys.stderr, flush=True)
        serve.run(build_app(_model_location(model), replicas=args.replicas, engine_kwargs=engine_kwargs,
                            settings=settings, app_name=APP_NAME, replica_cpus=args.replica_cpus,
                            replica_gpus=_replica_gpus(args)),
                  name=APP_NAME, route_prefix="/")
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serving {settings.model_name!r} at http://{shown}:{port}/v1 on {args.replicas} replica(s)"
              f"{' (API key required)' if settings.api_keys else ''}", flush=True)
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.wait(0.5):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    except KeyboardInterrupt:
        interrupted.append(signal.SIGINT)
    finally:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
    return 130 if signal.SIGINT in interrupted else 0
