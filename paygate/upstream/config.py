"""The upstream's typed view of the settings, built once by the app factory (or a CLI
command) with :meth:`paygate.config.Settings.upstream`; nothing in this package reads
``Settings`` itself."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import SecretStr

from paygate.upstream.engines.base import EngineKind

UpstreamMode = Literal["attach", "container"]


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Everything the model server's management needs (docs/CONFIG.md, "Upstream")."""

    mode: UpstreamMode = "attach"
    kind: EngineKind = "ollama"
    url: str = "http://127.0.0.1:11434"
    health_path: str | None = None
    # The key added for an attached (remote) server, resolved from its file; never for a
    # container. Never logged or shown.
    api_key: SecretStr | None = field(default=None, repr=False)
    monitor: bool = True
    health_interval: float = 5.0
    failure_threshold: int = 3
    ready_timeout: float = 120.0
    ready_probe_timeout: float = 2.0
    restart_backoff_max: float = 30.0
    retry_after_seconds: int = 1
    docker_host: str | None = None
    name: str | None = None
    image: str | None = None
    relay_image: str = "python:3-slim"
    volume: str | None = None
    models_dir: str | None = None
    port: int | None = None
    cpus: float | None = None
    memory: str | None = None
    pids_limit: int = 512
    gpus: str | None = None
    tmpfs: Mapping[str, str] = field(default_factory=dict)
    socket_dir: Path = Path("/run/paygate/upstream")
    pull_network: str = "paygate-pull"
    pull_timeout: float = 3600.0
    model_path: Path | None = None
    model_name: str | None = None
    expected_model_digests: Mapping[str, str] = field(default_factory=dict)
