"""``paygate upstream status|pull|stop``: the model server paygate runs or attaches to.

``--deployment NAME`` applies a named deployment's settings first (like ``serve NAME``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, TextIO

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, TaskID, TextColumn
from rich.progress import Progress as RichProgress

from paygate.cli.options import add_action, add_json, command_actions
from paygate.config import Settings, load_settings
from paygate.store.deployments import DeploymentStore, settings_overrides
from paygate.upstream import service
from paygate.upstream.config import UpstreamConfig
from paygate.upstream.container import ContainerManager, make_volume, on_engine
from paygate.upstream.engine import connect
from paygate.upstream.engines.base import ModelDigest
from paygate.upstream.errors import UpstreamError
from paygate.upstream.fleet import UpstreamEntry
from paygate.upstream.pull import Progress, pull
from paygate.upstream.readiness import probe
from paygate.upstream.spec import container_spec

BAR = 30


def register(sub: Any) -> None:
    actions = command_actions(sub, "upstream", "the model server: status, pull, stop")
    status = add_action(
        actions, "status", _status, "containers (container mode) and a health probe"
    )
    add_json(status)
    pulling = add_action(
        actions,
        "pull",
        _pull,
        "download a model into the model volume (the only step with network)",
    )
    pulling.add_argument("model", help="model name, e.g. llama3.2:1b")
    stop = add_action(actions, "stop", _stop, "stop and remove the containers (the volume stays)")
    for p in (status, pulling, stop):
        p.add_argument("--deployment", help="apply this named deployment's settings")
        p.add_argument(
            "--upstream",
            metavar="NAME",
            help="only this upstream of the set (PAYGATE_UPSTREAMS / [[upstream]])",
        )


def settings_for(args: argparse.Namespace) -> Settings:
    """Settings from the file and environment, with ``--deployment``'s applied on top."""
    settings = load_settings(args.config)
    if not getattr(args, "deployment", None):
        return settings
    deployment = DeploymentStore(settings.deployments_dir).get(args.deployment)
    overrides = settings_overrides(deployment, set(Settings.model_fields))
    return load_settings(args.config, **overrides)


def _require_container(config: UpstreamConfig, action: str) -> None:
    if config.mode != "container":
        raise UpstreamError(f"upstream {action} needs upstream_mode = container")


def _entries(args: argparse.Namespace) -> tuple[bool, tuple[UpstreamEntry, ...]]:
    """(several upstreams configured, the ones the command acts on): every upstream of the
    set, or the one ``--upstream`` names."""
    settings = settings_for(args)
    entries = settings.upstream_entries()
    several = bool(settings.upstreams)
    wanted = getattr(args, "upstream", None)
    if wanted is None:
        return several, entries
    chosen = tuple(e for e in entries if e.name == wanted)
    if not several or not chosen:
        names = ", ".join(e.name for e in entries) if several else "none configured"
        raise UpstreamError(f"no upstream named {wanted[:64]!r} (upstreams: {names})")
    return several, chosen


def _containers(args: argparse.Namespace, action: str) -> tuple[UpstreamConfig, ...]:
    """The container-mode upstreams ``action`` applies to (refused when there are none)."""
    _, entries = _entries(args)
    configs = tuple(e.config for e in entries if e.config.mode == "container")
    if not configs:
        _require_container(entries[0].config, action)
    return configs


async def _probe(config: UpstreamConfig) -> str:
    async with aiohttp.ClientSession(
        connector=service.connector(config, limit=1), trust_env=False
    ) as session:
        result = await probe(
            session,
            service.health_url(config),
            headers=service.auth_headers(config.api_key),
            timeout=config.ready_probe_timeout,
        )
    return "ready" if result.ok else f"not ready ({result.detail})"


def _status(args: argparse.Namespace) -> int:
    several, entries = _entries(args)
    if not several:
        return _report(_status_of(entries[0].config), args.json)
    reports = {e.name: _status_of(e.config) for e in entries}
    if args.json:
        print(json.dumps({"upstreams": reports}, indent=2))
        return 0
    for name, report in reports.items():
        print(f"upstream {name}")
        _print_lines(report, indent="  ")
    return 0


def _report(out: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(out, indent=2))
        return 0
    _print_lines(out)
    return 0


def _print_lines(out: dict[str, Any], indent: str = "") -> None:
    for key, value in out.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if v is not None)
        print(f"{indent}{key:8} {value}")


def _status_of(config: UpstreamConfig) -> dict[str, Any]:
    """What docker says of one upstream's containers (container mode), its weights and a
    live probe."""
    out: dict[str, Any] = {"mode": config.mode}
    if config.mode == "container":
        manager = ContainerManager(connect(config.docker_host), container_spec(config))
        out.update(manager.status())
        out["kind"] = config.kind
        out["models"] = _models(service.served_digests(config, manager))
        manager.client.close()
    else:
        out["kind"] = config.kind
        out["url"] = config.url
        out["models"] = _models(service.served_digests(config, None))
    out["health"] = asyncio.run(_probe(config))
    return out


def _models(served: list[ModelDigest]) -> dict[str, str]:
    """name -> weights digest (``sha256:...``), as /health/ready shows them."""
    return {item.name: item.digest for item in served}


def _stop(args: argparse.Namespace) -> int:
    for config in _containers(args, "stop"):
        manager = ContainerManager(connect(config.docker_host), container_spec(config))
        try:
            manager.stop()
        finally:
            manager.client.close()
        print(f"stopped {manager.spec.name}")
    return 0


class ProgressPrinter:
    """A rich progress bar on a terminal; one line per new status otherwise (logs, tests)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._last = ""
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None

    def __call__(self, progress: Progress) -> None:
        if self.tty:
            self._rich(progress)
            return
        line = render(progress)
        if line != self._last:
            self.stream.write(line + "\n")
            self.stream.flush()
        self._last = line

    def _rich(self, progress: Progress) -> None:
        if self._bar is None:
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                console=Console(file=self.stream),
            )
            self._bar.start()
            self._task = self._bar.add_task(progress.status[:32], total=None)
        assert self._task is not None
        self._bar.update(
            self._task,
            description=progress.status[:32],
            completed=progress.completed or 0,
            total=progress.total,
        )
        self._bar.refresh()  # now, not at the next tick of rich's refresh thread

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def render(progress: Progress) -> str:
    if progress.total and progress.completed is not None:
        share = min(max(progress.completed / progress.total, 0.0), 1.0)
        filled = int(share * BAR)
        return f"{progress.status[:32]:32} [{'#' * filled}{'.' * (BAR - filled)}] {share:4.0%}"
    return progress.status[:78]


def _pull(args: argparse.Namespace) -> int:
    configs = _containers(args, "pull")
    if len(configs) > 1:
        raise UpstreamError(
            "several container upstreams: name the one to pull into with --upstream"
        )
    config = configs[0]
    client = connect(config.docker_host)
    printer = ProgressPrinter(sys.stderr)
    try:
        spec = on_engine(client, container_spec(config))
        make_volume(client, spec)
        asyncio.run(
            pull(
                client,
                spec,
                args.model,
                on_progress=printer,
                ready_timeout=config.ready_timeout,
                timeout=config.pull_timeout,
            )
        )
    finally:
        printer.close()
        client.close()
    print(f"pulled {args.model}")
    return 0
