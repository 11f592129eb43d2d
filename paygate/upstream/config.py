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
    """Everything the model server's management needs (docs/CONFIG.md, "Upstream"). No
    defaults of its own: every field is a setting's value (``Settings.upstream``)."""

    mode: UpstreamMode
    kind: EngineKind
    url: str
    health_path: str | None
    # The key added for an attached (remote) server, resolved from its file; never for a
    # container. Never logged or shown.
    api_key: SecretStr | None = field(repr=False)
    monitor: bool
    health_interval: float
    failure_threshold: int
    ready_timeout: float
    ready_probe_timeout: float
    restart_backoff_max: float
    retry_after_seconds: int
    docker_host: str | None
    name: str | None
    image: str | None
    relay_image: str
    volume: str | None
    models_dir: str | None
    port: int | None
    cpus: float | None
    memory: str | None
    pids_limit: int
    gpus: str | None
    tmpfs: Mapping[str, str]
    socket_dir: Path
    pull_network: str
    pull_timeout: float
    model_path: Path | None
    model_name: str | None
    expected_model_digests: Mapping[str, str]
    # The deployment name an earlier version gave this one (a set's member under an
    # ``upstream_name``): its containers are replaced and its model volume kept at start.
    previous_name: str | None = None
