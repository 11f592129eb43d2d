"""The model server's containers: replace, start, inspect, restart, stop (docker SDK, blocking).

One deployment is a serving container and its relay (see :mod:`paygate.upstream.spec`). A
container of the same name left by an earlier run (the gateway was killed) is replaced; one
that paygate did not make (no ``io.paygate.role`` label) is refused and left alone. The
health monitor calls :meth:`ContainerManager.ensure_running` after a crash; the model volume
survives everything here, so models are never lost with a container.
"""

from __future__ import annotations

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
from paygate.upstream.spec import ROLE_LABEL, ContainerSpec, relay_kwargs, serving_kwargs

STOP_TIMEOUT = 10  # seconds docker waits after SIGTERM before SIGKILL


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
        try:
            container.remove(force=True, v=False)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            raise failure(f"remove stale container {name}", exc) from None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Replace whatever is left of this deployment, then create and start both containers."""
        self._remove_stale(self.spec.relay_name)
        self._remove_stale(self.spec.name)
        self._prepare_socket_dir()
        missing = f"image {self.spec.image} is not on this docker engine: docker pull it first"
        with _starting(self.spec.name, missing):
            serving = self.client.containers.create(**serving_kwargs(self.spec))
            serving.start()
        self._start_relay(serving.id)

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
        try:
            volume = self.client.volumes.get(self.spec.volume)
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as exc:
            raise failure(f"inspect volume {self.spec.volume}", exc) from None
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
