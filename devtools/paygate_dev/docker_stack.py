"""A throw-away Docker engine and locally built images, for the tests and the demo.

:class:`Dockerd` runs Debian's ``dockerd`` on a private socket in a temporary directory with
``--bridge=none --iptables=false --ip-forward=false``: it changes nothing of the host's
firewall or sysctls, so several test runs can each have one (paygate's isolation does not rest
on docker's iptables rules: serving containers have no network at all). It is stopped by its
own PID.

No image registry is reachable, so images are built here:

- a busybox image (Debian ``busybox-static``) for egress probes;
- llama.cpp's ``llama-server`` (built by scripts/setup_llama.sh) on the same Debian root, as
  its entrypoint, for container mode with a real model server;
- a Debian ``python3 python3-aiohttp`` root filesystem (``debootstrap``, about a minute, cached
  as a tar under ``~/.cache/paygate/images`` keyed by its recipe), imported, with the FAKE
  model server (``devtools/paygate_dev/fake_model.py``, run as a script) layered on top: it runs in
  Ollama's place, on Ollama's port, with Ollama's routes. The same image serves as the relay
  image (it has python3).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
from docker.models.containers import Container

from paygate.errors import PaygateError
from paygate_dev import fake_model
from paygate_dev.stack import ComponentMissing, require

START_TIMEOUT = 60.0  # seconds for dockerd to answer (about 1 s here)
STOP_TIMEOUT = 30.0
BUILD_TIMEOUT = 900  # seconds for debootstrap (about 45-70 s with a reachable mirror)
LOCK_TIMEOUT = 1200.0  # seconds to wait for another process building the same rootfs
SUITE = "bookworm"
PACKAGES = ("python3", "python3-aiohttp")
BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = ("sh", "nc", "ip", "netstat", "wget", "sleep", "cat", "ls", "echo", "true")
# Removed from the rootfs: documentation and caches no test reads (halves the tar).
_PRUNE = (
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
    "usr/share/zoneinfo", "var/cache/apt", "var/lib/apt/lists",
)  # fmt: skip


class DockerStartFailed(PaygateError):
    code = "dockerd_failed"


def cache_dir() -> Path:
    """Where built root filesystems are kept between runs (``PAYGATE_CACHE_DIR`` overrides)."""
    base = os.environ.get("PAYGATE_CACHE_DIR") or str(Path.home() / ".cache" / "paygate")
    return Path(base) / "images"


def mirror() -> str:
    return os.environ.get("PAYGATE_DEBIAN_MIRROR", "http://deb.debian.org/debian")


@dataclass
class Dockerd:
    """One private dockerd. ``host`` is what DOCKER_HOST / ``docker_host`` take."""

    directory: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def socket(self) -> Path:
        return self.directory / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log(self) -> Path:
        return self.directory / "dockerd.log"

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def start(self) -> None:
        binary = require("dockerd", "docker.io")
        for program, package in (("containerd", "containerd"), ("runc", "runc")):
            require(program, package)
        d = self.directory
        cmd = [
            binary,
            "--data-root", str(d / "root"),
            "--exec-root", str(d / "exec"),
            "--pidfile", str(d / "dockerd.pid"),
            "-H", self.host,
            "--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
            "--log-level=warn",
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self.socket.exists():
                with contextlib.suppress(docker.errors.DockerException, OSError):
                    client = docker.DockerClient(base_url=self.host, timeout=5)
                    try:
                        client.ping()
                        return
                    finally:
                        client.close()
            time.sleep(0.1)
        tail = self.log.read_text(errors="replace")[-2000:]
        self.stop()
        raise DockerStartFailed(f"dockerd did not start: {tail or 'no output'}")

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.host, timeout=120)

    def stop(self) -> None:
        """Remove every container, stop dockerd by its PID, delete its directory."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(docker.errors.DockerException, OSError):
                client = self.client()
                for container in client.containers.list(all=True):
                    with contextlib.suppress(docker.errors.DockerException):
                        container.remove(force=True)
                client.close()
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(sig)
                try:
                    self.process.wait(timeout=STOP_TIMEOUT)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.process = None
        _unmount_under(self.directory)
        shutil.rmtree(self.directory, ignore_errors=True)


def _unmount_under(directory: Path) -> None:
    # A dockerd killed hard can leave overlay and shm mounts behind; deepest first.
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = str(directory) + "/"
    targets = sorted(
        (line.split()[1] for line in mounts if line.split()[1].startswith(prefix)),
        key=len,
        reverse=True,
    )
    for target in targets:
        subprocess.run(["umount", "-l", target], check=False, capture_output=True, timeout=30)


def start_dockerd() -> Dockerd:
    """A running private dockerd in a fresh short-path temporary directory."""
    # Short path: containerd's sockets live under it and sun_path is 108 bytes.
    engine = Dockerd(Path(tempfile.mkdtemp(prefix="pgd-", dir="/tmp")))
    engine.start()
    return engine


# --- images ------------------------------------------------------------------------------------


def busybox_image(client: docker.DockerClient, tag: str = "paygate-test/busybox:1") -> str:
    """A busybox image from Debian's static busybox (a few MB; built in well under a second)."""
    if not BUSYBOX.exists():
        raise ComponentMissing(f"{BUSYBOX} missing: apt-get install busybox-static")
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        tar.add(BUSYBOX, arcname="bin/busybox")
        for applet in BUSYBOX_APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        for name in ("tmp", "proc", "sys", "dev", "etc"):
            entry = tarfile.TarInfo(name)
            entry.type, entry.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(entry)
    repository, _, version = tag.rpartition(":")
    client.api.import_image_from_data(data.getvalue(), repository=repository, tag=version)
    return tag


def _recipe_key(packages: tuple[str, ...] = PACKAGES) -> str:
    recipe = f"{SUITE}|{','.join(packages)}|{','.join(_PRUNE)}|v1"
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def python_rootfs() -> Path:
    """The cached Debian python3 + aiohttp root filesystem tar, built once per recipe."""
    return debian_rootfs(PACKAGES, name="debian-python")


def debian_rootfs(packages: tuple[str, ...], *, name: str) -> Path:
    """A cached Debian (minbase + ``packages``) root filesystem tar, built once per recipe."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{name}-{_recipe_key(packages)}.tar"
    if target.exists():
        return target
    debootstrap = require("debootstrap", "debootstrap")
    with _locked(directory / ".build.lock"):
        if target.exists():  # another run built it while we waited
            return target
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=directory))
        try:
            rootfs = work / "rootfs"
            result = subprocess.run(
                [debootstrap, "--variant=minbase", f"--include={','.join(packages)}",
                 SUITE, str(rootfs), mirror()],
                capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False,
            )  # fmt: skip
            if result.returncode != 0:
                tail = (result.stderr or result.stdout)[-1500:]
                raise PaygateError(f"debootstrap failed (mirror {mirror()}): {tail}")
            for path in _PRUNE:
                shutil.rmtree(rootfs / path, ignore_errors=True)
            partial = work / "rootfs.tar"
            subprocess.run(
                ["tar", "-C", str(rootfs), "-cf", str(partial), "."],
                check=True,
                capture_output=True,
                timeout=BUILD_TIMEOUT,
            )
            os.replace(partial, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def imported_base(client: docker.DockerClient, packages: tuple[str, ...], *, name: str) -> str:
    """The rootfs of ``packages`` as a local image (imported once per engine)."""
    tag = f"paygate-test/{name}:{_recipe_key(packages)}"
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        repository, _, version = tag.rpartition(":")
        tar = debian_rootfs(packages, name=name)
        client.api.import_image_from_file(str(tar), repository=repository, tag=version)
    return tag


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PaygateError(f"timed out waiting for the build lock {path}") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fake_ollama_image(client: docker.DockerClient) -> str:
    """The FAKE model server in Ollama's place: ``python3 fake_model.py`` on port 11434."""
    base = _debian_python_base(client)
    source = Path(fake_model.__file__).read_bytes()
    tag = f"paygate-test/fake-ollama:{hashlib.sha256(source).hexdigest()[:12]}"
    dockerfile = (
        f"FROM {base}\n"
        "COPY fake_model.py /opt/paygate/fake_model.py\n"
        "ENV HOME=/root OLLAMA_HOST=0.0.0.0:11434\n"
        "EXPOSE 11434\n"
        'CMD ["python3", "-I", "/opt/paygate/fake_model.py"]\n'
    ).encode()
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in (("Dockerfile", dockerfile), ("fake_model.py", source)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    try:
        client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True, forcerm=True)
    except docker.errors.BuildError as exc:
        raise PaygateError(f"building {tag} failed: {exc.msg}") from None
    return tag


def _debian_python_base(client: docker.DockerClient) -> str:
    return imported_base(client, PACKAGES, name="debian-python")


def llama_server_image(client: docker.DockerClient, binary: Path) -> str:
    """llama-server as the entrypoint of the Debian root (which has libstdc++ and libgcc).

    No model inside: container mode bind-mounts the weights file read-only.
    """
    base = _debian_python_base(client)
    data = binary.read_bytes()
    tag = f"paygate-test/llama-server:{hashlib.sha256(data).hexdigest()[:12]}"
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.get(tag)
        return tag
    dockerfile = (
        f"FROM {base}\n"
        "COPY llama-server /opt/llama/llama-server\n"
        "EXPOSE 8080\n"
        'ENTRYPOINT ["/opt/llama/llama-server"]\n'
    ).encode()
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        files = (("Dockerfile", dockerfile, 0o644), ("llama-server", data, 0o755))
        for name, content, mode in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(content), mode
            tar.addfile(info, io.BytesIO(content))
    context.seek(0)
    try:
        client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True, forcerm=True)
    except docker.errors.BuildError as exc:
        raise PaygateError(f"building {tag} failed: {exc.msg}") from None
    return tag


# --- systemd as PID 1, with paygate installed --------------------------------------------------

SYSTEMD_PACKAGES = ("systemd", "systemd-sysv", "python3", "python3-venv")
_SYSTEMD_DOCKERFILE = """\
FROM {base}
COPY wheels /tmp/wheels
RUN python3 -m venv /opt/paygate/venv \\
 && /opt/paygate/venv/bin/pip install --no-index --no-cache-dir --find-links /tmp/wheels paygate \\
 && rm -rf /tmp/wheels
COPY paygate.service /etc/systemd/system/paygate.service
# Units that need hardware or a console do nothing useful in a container.
RUN systemctl mask systemd-udevd.service systemd-udevd-control.socket \\
      systemd-udevd-kernel.socket getty.target console-getty.service systemd-logind.service \\
      systemd-timesyncd.service systemd-networkd.service systemd-resolved.service
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
"""


def systemd_paygate_image(client: docker.DockerClient, wheels: Path, unit: Path) -> str:
    """Debian with systemd as PID 1, paygate installed from ``wheels`` into /opt/paygate/venv
    and ``unit`` as /etc/systemd/system/paygate.service (not started)."""
    base = imported_base(client, SYSTEMD_PACKAGES, name="debian-systemd")
    digest = hashlib.sha256(unit.read_bytes())
    for wheel in sorted(wheels.glob("*.whl")):
        digest.update(wheel.name.encode() + wheel.read_bytes())
    tag = f"paygate-test/systemd-paygate:{digest.hexdigest()[:12]}"
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        dockerfile = _SYSTEMD_DOCKERFILE.format(base=base).encode()
        for name, data in (("Dockerfile", dockerfile), ("paygate.service", unit.read_bytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for wheel in wheels.glob("*.whl"):
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
    context.seek(0)
    try:
        client.images.build(
            fileobj=context,
            custom_context=True,
            tag=tag,
            rm=True,
            forcerm=True,
            network_mode="none",
            timeout=BUILD_TIMEOUT,
        )
    except docker.errors.BuildError as exc:
        raise PaygateError(f"building {tag} failed: {exc.msg}") from None
    return tag


def run_systemd(client: docker.DockerClient, image: str, name: str) -> Container:
    """A container with systemd as PID 1 (the flags systemd needs; no network)."""
    return client.containers.run(
        image,
        name=name,
        detach=True,
        network_mode="none",
        cap_add=["SYS_ADMIN"],
        security_opt=["seccomp=unconfined"],
        cgroupns="host",
        volumes={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}},
        tmpfs={"/run": "", "/run/lock": ""},
    )


# --- the product image (the repository's Dockerfile) on a local base ------------------------------

IMAGE_BASE_PACKAGES = ("python3", "python3-venv")


def product_image(client: docker.DockerClient, wheels: Path, dockerfile: Path, base: str) -> str:
    """The repository's Dockerfile built on ``base`` with ``wheels`` as its ``wheels/``.

    Built on the host network: the Dockerfile fetches the TSS runtime libraries with apt when
    the base lacks them (the wheels need no index).
    """
    digest = hashlib.sha256(dockerfile.read_bytes() + base.encode())
    for wheel in sorted(wheels.glob("*.whl")):
        digest.update(wheel.name.encode() + wheel.read_bytes())
    tag = f"paygate-test/paygate:{digest.hexdigest()[:12]}"
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        tar.add(dockerfile, arcname="Dockerfile")
        for wheel in wheels.glob("*.whl"):
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
    context.seek(0)
    try:
        client.images.build(
            fileobj=context,
            custom_context=True,
            tag=tag,
            rm=True,
            forcerm=True,
            buildargs={"BASE": base},
            network_mode="host",
            timeout=BUILD_TIMEOUT,
        )
    except docker.errors.BuildError as exc:
        log = "".join(str(line.get("stream", "")) for line in exc.build_log)[-2000:]
        raise PaygateError(f"building {tag} failed: {exc.msg}\n{log}") from None
    return tag
