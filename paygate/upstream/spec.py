"""What the model server's containers look like, as pure data (docker SDK keyword arguments).

Three containers, all from the same hardening:

- serving: the model server with ``network_mode=none`` (no interface but its own loopback),
  its model volume, CPU/memory/pids limits, every capability dropped, no-new-privileges,
  a read-only root filesystem with tmpfs where it must write, GPUs only if asked for;
- relay: a second container in the serving container's network namespace that exposes the
  model server's port as a unix socket in a host directory only the gateway can open
  (:mod:`paygate.upstream.relay`);
- pull: short-lived, the only one with a network (egress for downloading models), its port
  published on 127.0.0.1 only, writing into the same model volume.

Nothing here talks to docker, so the tests can check every option without an engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docker.types import DeviceRequest, LogConfig, Mount

from paygate.upstream import relay
from paygate.upstream.config import UpstreamConfig
from paygate.upstream.engines import profile_for
from paygate.upstream.engines.base import EngineKind, LaunchTarget
from paygate.upstream.errors import InvalidName
from paygate.upstream.names import container_name, deployment_containers

ROLE_LABEL = "io.paygate.role"
DEPLOYMENT_LABEL = "io.paygate.deployment"
# On every container and model volume made since set members were named within
# upstream_name: a deployment (or volume) named paygate-<upstream> that carries it is another
# gateway's current one, never an earlier version's to adopt (paygate.upstream.container).
NAMING_LABEL = "io.paygate.naming"
NAMING = "upstream_name"
SOCKET_NAME = "upstream.sock"
RELAY_MOUNT = "/run/paygate"
RELAY_SCRIPT_MOUNT = "/opt/paygate-relay/relay.py"
_MAX_UNIX_PATH = 107  # sun_path holds 108 bytes including the terminating NUL
_LOGS = LogConfig(type="json-file", config={"max-size": "10m", "max-file": "2"})


# The spec's fields that are the settings of the same name as they are (no engine default).
_AS_CONFIGURED = ("relay_image", "cpus", "memory", "pids_limit", "gpus", "pull_network", "kind")


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """One deployment's containers. ``name`` is already a valid container name."""

    name: str
    image: str
    relay_image: str
    volume: str
    models_mount: str
    port: int
    socket_dir: Path
    cpus: float | None
    memory: str | None
    pids_limit: int
    gpus: str | None
    tmpfs: dict[str, str]
    pull_network: str
    kind: EngineKind = "ollama"
    model_path: Path | None = None  # a file bind-mounted read-only (engines that serve one)
    alias: str = "model"
    # The deployment's name before names included upstream_name, and the model volume it had
    # (adopted: paygate.upstream.container.on_engine); None where the name did not change.
    previous: str | None = None
    previous_volume: str | None = None
    # False only to make what an earlier version made (unmarked by NAMING_LABEL): tests.
    marked: bool = True
    relay_script: Path = field(default_factory=lambda: Path(relay.__file__).resolve())
    user: str = field(default_factory=lambda: f"{os.getuid()}:{os.getgid()}")

    @property
    def relay_name(self) -> str:
        return deployment_containers(self.name)[1]

    @property
    def pull_name(self) -> str:
        return deployment_containers(self.name)[2]

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / SOCKET_NAME

    @property
    def health_path(self) -> str:
        return profile_for(self.kind).health_path

    @property
    def base_url(self) -> str:
        """The URL the gateway uses over the relay socket (Host: localhost, as Ollama wants)."""
        return f"http://localhost:{self.port}"


def container_spec(config: UpstreamConfig, name: str | None = None) -> ContainerSpec:
    """The container spec for ``config`` (``name`` overrides its ``name``).

    Unset image, port, models directory, name and volume take the defaults of the kind's
    engine profile.
    """
    profile = profile_for(config.kind)
    if profile.container is None:
        raise InvalidName(f"upstream_kind {config.kind} has no container recipe")
    defaults = profile.container
    cname = container_name(name or config.name or defaults.name)
    socket_dir = config.socket_dir / cname
    if len(str(socket_dir / SOCKET_NAME).encode()) > _MAX_UNIX_PATH:
        raise InvalidName(f"upstream_socket_dir is too long for a unix socket: {socket_dir}")
    model_path = config.model_path
    alias = config.model_name or (model_path.name if model_path else "model")
    previous = container_name(config.previous_name) if config.previous_name else None
    return ContainerSpec(
        name=cname,
        image=config.image or defaults.image,
        volume=config.volume or _models_volume(cname),
        models_mount=config.models_dir or defaults.models_dir,
        port=config.port or defaults.port,
        socket_dir=socket_dir,
        tmpfs=dict(config.tmpfs),
        model_path=model_path.resolve() if model_path else None,
        alias=alias,
        previous=previous,
        previous_volume=_models_volume(previous) if previous and not config.volume else None,
        **{setting: getattr(config, setting) for setting in _AS_CONFIGURED},
    )


def _models_volume(deployment: str) -> str:
    """The model volume a deployment named ``deployment`` makes when none is configured."""
    return f"{deployment}-models"


def _hardening(spec: ContainerSpec, role: str) -> dict[str, Any]:
    return {
        "detach": True,
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "restart_policy": {"Name": "no"},  # paygate's monitor restarts it, with backoff
        "log_config": _LOGS,
        "labels": {
            ROLE_LABEL: role,
            DEPLOYMENT_LABEL: spec.name,
            **({NAMING_LABEL: NAMING} if spec.marked else {}),
        },
    }


def _model_server(spec: ContainerSpec, role: str, listen: str) -> dict[str, Any]:
    kwargs = _hardening(spec, role)
    threads = max(1, int(spec.cpus)) if spec.cpus is not None else None
    launch = profile_for(spec.kind).launch(
        LaunchTarget(
            listen=listen,
            port=spec.port,
            models_dir=spec.models_mount,
            model_path=spec.model_path,
            alias=spec.alias,
            threads=threads,
        )
    )
    if launch.model_file is not None and launch.model_target is not None:
        # The one weights file, read-only: the server cannot alter what it serves.
        mounts = [
            Mount(
                target=launch.model_target,
                source=str(launch.model_file),
                type="bind",
                read_only=True,
            )
        ]
    else:
        mounts = [Mount(target=spec.models_mount, source=spec.volume, type="volume")]
    kwargs.update(
        image=spec.image,
        environment=dict(launch.environment),
        mounts=mounts,
        tmpfs=dict(spec.tmpfs),
        pids_limit=spec.pids_limit,
    )
    if launch.command:
        kwargs["command"] = list(launch.command)
    if spec.cpus is not None:
        kwargs["nano_cpus"] = int(spec.cpus * 1_000_000_000)
    if spec.memory is not None:
        kwargs["mem_limit"] = spec.memory
        kwargs["memswap_limit"] = spec.memory  # no swap on top of the limit
    if spec.gpus:
        kwargs["device_requests"] = [gpu_request(spec.gpus)]
    return kwargs


def serving_kwargs(spec: ContainerSpec) -> dict[str, Any]:
    """The serving container: no network at all; listens on its own loopback only."""
    kwargs = _model_server(spec, "serving", "127.0.0.1")
    kwargs.update(name=spec.name, network_mode="none")
    return kwargs


def relay_kwargs(spec: ContainerSpec, serving_id: str) -> dict[str, Any]:
    """The relay: inside the serving container's namespace, runs as the gateway's user."""
    kwargs = _hardening(spec, "relay")
    kwargs.update(
        image=spec.relay_image,
        name=spec.relay_name,
        network_mode=f"container:{serving_id}",
        entrypoint=["python3", "-I", RELAY_SCRIPT_MOUNT],
        command=[f"{RELAY_MOUNT}/{SOCKET_NAME}", str(spec.port)],
        user=spec.user,
        mounts=[
            Mount(target=RELAY_MOUNT, source=str(spec.socket_dir), type="bind"),
            Mount(
                target=RELAY_SCRIPT_MOUNT,
                source=str(spec.relay_script),
                type="bind",
                read_only=True,
            ),
        ],
        pids_limit=32,
        mem_limit="64m",
        memswap_limit="64m",
        nano_cpus=500_000_000,
    )
    return kwargs


def pull_kwargs(spec: ContainerSpec) -> dict[str, Any]:
    """The pull container: egress on the pull network, its port on 127.0.0.1 only."""
    kwargs = _model_server(spec, "pull", "0.0.0.0")  # noqa: S104 - inside its own namespace
    kwargs.update(
        name=spec.pull_name,
        network=spec.pull_network,
        ports={f"{spec.port}/tcp": ("127.0.0.1", None)},
    )
    return kwargs


def gpu_request(gpus: str) -> DeviceRequest:
    """``all`` or a comma-separated list of device ids, as ``docker run --gpus``."""
    if gpus.strip().lower() == "all":
        return DeviceRequest(count=-1, capabilities=[["gpu"]])
    ids = [item.strip() for item in gpus.split(",") if item.strip()]
    return DeviceRequest(device_ids=ids, capabilities=[["gpu"]])
