"""``metasep serve``: a page to separate a song, listen to its stems and remix them.

The server binds to 127.0.0.1 unless told otherwise, and then accepts only requests addressed to
this machine by name (``Host`` header), which keeps other web sites from reaching it through DNS
rebinding. It has no accounts: bind it to another address only on a network you trust.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import socket
from pathlib import Path

from pipeline.commands import UsageError
from pipeline.commands.options import add_separation_arguments, add_storage_options
from pipeline.commands.separate import build_separator
from pipeline.settings import settings_from_args
from pipeline.storage.location import open_location

LOCAL_NAMES = ["127.0.0.1", "localhost"]

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="web page to separate a song and remix its stems",
        description="Serve a page where you upload a song (or pick a track of a separated "
        "catalog), follow its separation, play the four stems, remix them with volume sliders, "
        "mute, solo, karaoke, and download the stems and the remix.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (8000; 0 picks a free one)")
    add_separation_arguments(
        parser, ("checkpoint", "device", "precision", "segment", "context", "batch_size")
    )
    parser.add_argument(
        "--catalog",
        metavar="DST",
        help="also offer the tracks of a separated catalog (the DST of metasep separate SRC DST)",
    )
    add_storage_options(parser, "fsspec options of --catalog")
    parser.add_argument(
        "--max-upload-mb", type=float, default=200.0, metavar="MB", help="upload limit (200)"
    )
    parser.add_argument(
        "--max-minutes", type=float, default=20.0, metavar="MIN", help="longest track (20)"
    )
    parser.add_argument(
        "--keep-jobs", type=int, default=10, metavar="N", help="finished songs kept (10)"
    )
    parser.add_argument(
        "--max-queue", type=int, default=8, metavar="N", help="songs that may wait (8)"
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also accept requests for this host name (repeatable; when bound to 127.0.0.1 only "
        "127.0.0.1 and localhost are accepted, elsewhere any)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="where job folders go (default: a temporary folder)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from pipeline.serve.app import create_app

    limits = _limits(args)
    shared = settings_from_args(args)  # separation options, device, storage options
    catalog = _catalog(args, shared.options()) if args.catalog else None
    separator = build_separator(shared)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    print(
        f"metasep serve: {url} (model {separator.model_id} on {separator.device}; uploads up to "
        f"{args.max_upload_mb:g} MB and {args.max_minutes:g} min"
        + (f"; catalog {args.catalog}" if catalog else "")
        + "). Ctrl+C to stop.",
        flush=True,
    )
    if limits.allowed_hosts is None:
        log.warning("bound to %s: anyone who can reach it can use it (no accounts)", host)
    app = create_app(separator, limits, catalog)
    config = uvicorn.Config(
        app,
        log_level="debug" if args.verbose else "warning",
        access_log=args.verbose,
        timeout_graceful_shutdown=5,
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl+C after shutting down
        uvicorn.Server(config).run(sockets=[sock])
    print("metasep serve: stopped; the job folders are deleted", flush=True)
    return 0


def _limits(args: argparse.Namespace):
    from pipeline.serve.app import ServerLimits

    for name in ("max_upload_mb", "max_minutes", "keep_jobs", "max_queue"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be more than 0")
    return ServerLimits(
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_seconds=args.max_minutes * 60.0,
        keep_jobs=args.keep_jobs,
        max_queue=args.max_queue,
        workdir=args.workdir,
        allowed_hosts=allowed_hosts(args.host, args.allow_host),
    )


def allowed_hosts(host: str, extra: list[str]) -> list[str] | None:
    """Host names the server answers: the loopback names when bound to loopback (plus
    ``extra``); any (None) when bound elsewhere, unless ``extra`` names some."""
    if _is_loopback(host):
        return [*LOCAL_NAMES, *extra]
    return list(extra) or None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _catalog(args: argparse.Namespace, storage_options: dict | None):
    from pipeline.serve.catalog import Catalog

    fs, root = open_location(args.catalog, storage_options)
    try:
        exists = fs.isdir(root)
    except OSError as error:
        raise UsageError(f"--catalog {args.catalog}: {error}") from None
    if not exists:
        raise UsageError(f"--catalog {args.catalog}: no such folder")
    return Catalog(args.catalog, storage_options)


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a UsageError saying why not (busy, bad address)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as error:
        raise UsageError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock
