"""The model server's containers: replace, start, inspect, restart, stop (docker SDK, blocking).

One deployment is a serving container and its relay (see :mod:`paygate.upstream.spec`). A
container of the same name left by an earlier run (the gateway was killed) is replaced; one
that paygate did not make (no ``io.paygate.role`` label) is refused and left alone. A set's
member named before names included ``upstream_name`` (``paygate-<upstream>``) is adopted at
start: its containers are replaced like a leftover of this deployment (as they were when that
was its name), and its model volume stays in use while the new name has none. The
health monitor calls :meth:`ContainerManager.ensure_running` after a crash; the model volume
survives everything here, so models are never lost with a container.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

from paygate.upstream.engine import failure
from paygate.upstream.errors import ContainerFailed
from paygate.upstream.names import deployment_containers
from paygate.upstream.spec import (
    DEPLOYMENT_LABEL,
    NAMING,
    NAMING_LABEL,
    ROLE_LABEL,
    ContainerSpec,
    relay_kwargs,
    serving_kwargs,
)

log = logging.getLogger("paygate.upstream")
STOP_TIMEOUT = 10  # seconds docker waits after SIGTERM before SIGKILL


def _volume_labels(client: docker.DockerClient, name: str) -> dict[str, str] | None:
    """The labels of volume ``name``; None when there is no such volume."""
    try:
        volume = client.volumes.get(name)
    except docker.errors.NotFound:
        return None
    except docker.errors.APIError as exc:
        raise failure(f"inspect volume {name}", exc) from None
    return volume.attrs.get("Labels") or {}


def on_engine(client: docker.DockerClient, spec: ContainerSpec) -> ContainerSpec:
    """``spec`` as it is on this engine: with the model volume the deployment had under its
    previous name while that one exists and the new one does not (an upgraded gateway keeps
    the models it downloaded). A volume of that name marked by this version is not that: it is
    the current volume of another gateway on the engine whose members keep that name (it has
    no ``upstream_name``), and stays its own."""
    previous = spec.previous_volume
    if previous is None or _volume_labels(client, spec.volume) is not None:
        return spec
    labels = _volume_labels(client, previous)
    if labels is None or NAMING_LABEL in labels:
        return spec
    return dataclasses.replace(spec, volume=previous)


def make_volume(client: docker.DockerClient, spec: ContainerSpec) -> None:
    """Create the deployment's model volume, marked, unless it exists (docker would make it
    unmarked when a container first mounts it: adoptable by another gateway, see on_engine)."""
    if not spec.marked or _volume_labels(client, spec.volume) is not None:
        return
    try:
        client.volumes.create(name=spec.volume, labels={NAMING_LABEL: NAMING})
    except docker.errors.APIError as exc:
        raise failure(f"create volume {spec.volume}", exc) from None


def _remove(container: Container, what: str) -> bool:
    """Remove ``container`` (its volumes kept); False when it was gone already."""
    try:
        container.remove(force=True, v=False)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as exc:
        raise failure(f"remove {what}", exc) from None
    return True


@contextmanager
def _starting(name: str, missing: str) -> Iterator[None]:
    """Starting container ``name``: an absent image is ``missing`` (what to do about it), any
    other refusal the engine's own words."""
    try:
        yield
    except docker.errors.ImageNotFound:
        raise ContainerFailed(missing) from None
    except docker.errors.APIError as exc:
        raise failure(f"start {name}", exc) from None


class ContainerManager:
    """Lifecycle of one deployment's serving and relay containers."""

    def __init__(self, client: docker.DockerClient, spec: ContainerSpec) -> None:
        self.client = client
        self.spec = spec

    # --- lookups ------------------------------------------------------------------------------

    def _get(self, name: str) -> Container | None:
        try:
            return self.client.containers.get(name)
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as exc:
            raise failure(f"inspect {name}", exc) from None

    def _remove_stale(self, name: str) -> None:
        container = self._get(name)
        if container is None:
            return
        if ROLE_LABEL not in (container.labels or {}):
            raise ContainerFailed(
                f"a container named {name} exists and paygate did not create it: "
                "remove it or set upstream_name"
            )
        _remove(container, f"stale container {name}")

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Replace whatever is left of this deployment, then create and start both containers."""
        self.spec = on_engine(self.client, self.spec)
        make_volume(self.client, self.spec)
        self._adopt_previous()
        self._remove_stale(self.spec.relay_name)
        self._remove_stale(self.spec.name)
        self._prepare_socket_dir()
        missing = f"image {self.spec.image} is not on this docker engine: docker pull it first"
        with _starting(self.spec.name, missing):
            serving = self.client.containers.create(**serving_kwargs(self.spec))
            serving.start()
        self._start_relay(serving.id)

    def _adopt_previous(self) -> None:
        """Replace the containers this deployment had under its previous name (paygate's, of
        that deployment, made by an earlier version: anything else of that name is not ours and
        is left alone; one marked by this version is another gateway's, running its members
        under that name now)."""
        previous = self.spec.previous
        if previous is None:
            return
        for name in reversed(deployment_containers(previous)):  # pull, relay, then serving
            container = self._get(name)
            labels = (container.labels or {}) if container is not None else {}
            if container is None or labels.get(DEPLOYMENT_LABEL) != previous:
                continue
            if NAMING_LABEL in labels:
                log.warning(
                    "upstream deployment %s leaves container %s alone: another gateway's on"
                    " this engine (give it an upstream_name too)",
                    self.spec.name,
                    name,
                )
                continue
            if not _remove(container, f"previous container {name}"):
                continue
            log.info("upstream deployment %s replaces its container %s (its name before)",
                     self.spec.name, name)  # fmt: skip

    def _start_relay(self, serving_id: str) -> None:
        self._remove_stale(self.spec.relay_name)
        missing = f"relay image {self.spec.relay_image} is not on this docker engine"
        with _starting(self.spec.relay_name, missing):
            self.client.containers.run(**relay_kwargs(self.spec, serving_id))

    def _prepare_socket_dir(self) -> None:
        directory = self.spec.socket_dir
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)  # only the gateway's user (and root) may open the socket
        self.spec.socket_path.unlink(missing_ok=True)

    def ensure_running(self) -> str:
        """Bring both containers back after a crash; returns what was done (for the log)."""
        serving = self._get(self.spec.name)
        if serving is None:
            self.start()
            return "recreated"
        if serving.status != "running":
            try:
                serving.start()
            except docker.errors.APIError as exc:
                raise failure(f"restart {self.spec.name}", exc) from None
            # The relay joined the old network namespace, which died with the old process.
            self._start_relay(serving.id)
            return "restarted"
        relay = self._get(self.spec.relay_name)
        if relay is None or relay.status != "running":
            self._start_relay(serving.id)
            return "relay restarted"
        return "running"

    def volume_path(self) -> Path | None:
        """Where the model volume lives on the host, if this process can read it."""
        name = on_engine(self.client, self.spec).volume
        try:
            volume = self.client.volumes.get(name)
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as exc:
            raise failure(f"inspect volume {name}", exc) from None
        mountpoint = volume.attrs.get("Mountpoint")
        if not isinstance(mountpoint, str):
            return None
        path = Path(mountpoint) / "models"  # OLLAMA_MODELS is <models_dir>/models
        return path if os.access(path, os.R_OK | os.X_OK) else None

    def crashed(self) -> bool:
        """True if the serving or relay container is not running (or gone)."""
        for name in (self.spec.name, self.spec.relay_name):
            container = self._get(name)
            if container is None or container.status != "running":
                return True
        return False

    def stop(self) -> None:
        """Stop and remove both containers and the socket; the model volume stays."""
        errors: list[str] = []
        for name, timeout in ((self.spec.relay_name, 2), (self.spec.name, STOP_TIMEOUT)):
            container = self._get(name)
            if container is None:
                continue
            try:
                container.stop(timeout=timeout)
                container.remove(force=True, v=False)
            except docker.errors.NotFound:
                continue
            except docker.errors.APIError as exc:
                errors.append(str(failure(f"remove {name}", exc)))
        self.spec.socket_path.unlink(missing_ok=True)
        if errors:
            raise ContainerFailed("; ".join(errors))

    def status(self) -> dict[str, Any]:
        """What docker says about both containers (for ``paygate upstream status``)."""
        out: dict[str, Any] = {"name": self.spec.name, "image": self.spec.image}
        for role, name in (("serving", self.spec.name), ("relay", self.spec.relay_name)):
            container = self._get(name)
            if container is None:
                out[role] = {"state": "absent"}
                continue
            state = container.attrs.get("State", {})
            out[role] = {
                "state": container.status,
                "id": container.short_id,
                "started_at": state.get("StartedAt"),
                "exit_code": state.get("ExitCode"),
                "oom_killed": state.get("OOMKilled"),
            }
        out["socket"] = str(self.spec.socket_path)
        return out
