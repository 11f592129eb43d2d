"""``paygate fake-upstream``: the deterministic FAKE model server as a command (tests, demos)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from paygate.config import split_listen
from paygate.server.logs import install_safe_logging
from paygate_dev import fake_model

log = logging.getLogger("paygate_dev")


def register_fake_upstream(sub: Any) -> None:
    fake = sub.add_parser(
        "fake-upstream", help="run the deterministic FAKE model server (tests and demos only)"
    )
    fake.add_argument("--listen", default="127.0.0.1:11434", help="host:port (loopback default)")
    fake.add_argument("--pace", type=float, default=0.0, help="seconds between stream chunks")
    fake.add_argument("--chunks", type=int, default=4, help="words in each reply")
    fake.set_defaults(run=_fake_upstream)


def _fake_upstream(args: argparse.Namespace) -> int:
    try:
        host, port = split_listen(args.listen)
    except ValueError as exc:
        raise SystemExit(f"--listen: {exc}") from None
    install_safe_logging()
    log.info("FAKE model server (not a model) on %s", args.listen)
    fake_model.run(host, port, pace=args.pace, chunks=args.chunks)
    return 0
