"""``paygate discover``: which model servers run on this host (paygate.upstream.discovery)."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from typing import Any

from paygate.cli.options import add_json, whole_number
from paygate.cli.tables import print_table
from paygate.config import load_settings
from paygate.upstream.discovery import DEFAULT_PORTS, discover, rows

_PORT = whole_number(1, 65535, "a port is 1..65535")


def register(sub: Any) -> None:
    p = sub.add_parser("discover", help="find local model servers and their models")
    p.add_argument("--port", type=_PORT, action="append", default=[], help="also probe this port")
    p.add_argument("--only", action="store_true", help="probe only the --port ports")
    p.add_argument("--host", default="127.0.0.1", help="host to probe (default loopback)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per port")
    add_json(p)
    p.set_defaults(run=_discover)


def _discover(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    ports = set(args.port) if args.only else {*DEFAULT_PORTS, *settings.discover_ports, *args.port}
    timeout = args.timeout or settings.discover_timeout
    found = asyncio.run(discover(sorted(ports), host=args.host, timeout=timeout))
    if args.json:
        print(json.dumps([asdict(item) for item in found], indent=2))
    elif found:
        print_table(rows(found))
    else:
        print(f"no model server answered on {args.host} ports {', '.join(map(str, sorted(ports)))}")
    return 0
