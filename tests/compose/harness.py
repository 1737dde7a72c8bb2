"""Docker for tests: a private dockerd, stand-in images, compose projects, and a full clean-up.

No image can be pulled where these tests run, and the host's own servers (PostgreSQL,
RabbitMQ, any dockerd) must stay as they are. So everything here is private and is
removed again, pass or fail:

- `docker_session(workdir)` (a context manager) is the entry point: it checks it may run
  (root, Debian's `docker.io`, `docker-compose`, `debootstrap`; otherwise `Unavailable`
  says which), starts a dockerd of its own (`Dockerd`), and on exit removes every
  container, volume, network and image it made, stops that dockerd, deletes its
  directories and bridges, and checks the host's `ip_forward`, iptables and `docker0`
  are as they were. SIGTERM and SIGHUP during the session end it the same way. One
  session runs at a time on a machine; a second waits for the first to end.
- `Dockerd`: `--data-root`, `--exec-root`, `--pidfile` and a socket of its own
  (`DOCKER_HOST` in `Dockerd.env`), its own containerd, no iptables rules, no
  `ip_forward`, no `docker0` (`--iptables=false --ip-forward=false --bridge=none`):
  published ports go through docker-proxy, containers reach each other on their
  compose network, and only image builds reach the network, on the host's
  (`--network host`). `Dockerd.docker(*args)` runs Debian's docker CLI against it.
  Its containers' DNS is `DnsForwarder`, on the host's own address: without NAT,
  Docker's embedded DNS cannot reach the host's nameserver, and a name it cannot
  answer itself (a stopped container's) took 20 s to fail.
- `build_base(dockerd, workdir)`: Debian bookworm by debootstrap (minbase), trusting the
  host's CA bundle, imported as `BASE_IMAGE`.
- `build_standins(dockerd, names, workdir)`: for each image name (as the compose file
  and the Dockerfile spell it) the stand-in from `standins/` built on the base and
  tagged with exactly that name; `STANDINS` maps names to stand-ins. Builds that reach
  a registry trust the host's CA bundle; an apt or pip proxy/index set in the host's
  environment is passed on as build arguments, never written into the repository.
- `images_named(compose_file)`: every image a compose file and its Dockerfiles use.
- `Project(dockerd, name, compose_file, env)`: one compose project (`docker-compose` v1):
  `compose(*args)`, `up(*services)`, `wait_healthy()`, `containers(service)`,
  `ip(service)`, `down()`, `close()`; `Project.shim_dir` holds a `docker` whose `docker compose …`
  is this project, so README's commands run verbatim.

`COMPOSE_TEST_BASE_TARBALL=/path/rootfs.tar` reuses a debootstrap tarball (for
development; CI builds it cold).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
STANDINS_DIR = Path(__file__).resolve().parent / "standins"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # Debian's client, whatever else is first on PATH
COMPOSE = "/usr/bin/docker-compose"
DEBOOTSTRAP = "/usr/sbin/debootstrap"
NEEDED = {
    DOCKERD: "docker.io",
    DOCKER: "docker.io",
    COMPOSE: "docker-compose",
    DEBOOTSTRAP: "debootstrap",
}

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_IMAGE = "payments-compose-test/debian:bookworm"
# Every name the compose file or the Dockerfile uses that a stand-in replaces.
STANDINS = {
    "python:3.11-slim-bookworm": "python",
    "postgres:15-alpine": "postgres",
    "rabbitmq:3.13-management-alpine": "rabbitmq",
    "prom/prometheus:v2.55.1": "prometheus",
}
# Where every session keeps its daemon's state; a session killed outright leaves its
# directory, and the next one removes it (stopping that daemon first).
STATE_ROOT = Path("/var/tmp/payments-compose-test")  # noqa: S108  # root-only, fixed on purpose: found again after a crash
# Held for a whole session: one session at a time on a machine (see `_one_session_at_a_time`).
SESSION_LOCK = Path("/run/payments-compose-test.lock")
# The environment variables a build may need to reach a registry through the host's way.
PASSED_ON = (
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
)


class Unavailable(Exception):
    """This machine cannot run the compose tests (the message says why)."""


def say(message: str) -> None:
    print(f"[compose {time.strftime('%H:%M:%S')}] {message}", flush=True)  # noqa: T201


def _base_env() -> dict[str, str]:
    # Debian's docker and docker-compose first on PATH; nothing from the host's own Docker.
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
    return {**keep, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def run(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    check: bool = True,
    input: bytes | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv),
        env=env,
        cwd=cwd,
        capture_output=True,
        timeout=timeout,
        check=False,
        input=input.decode() if input is not None else None,
        text=True,
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(argv)} exited {result.returncode}\n{result.stdout[-3000:]}"
            f"\n{result.stderr[-3000:]}"
        )
    return result


def check_available() -> None:
    if os.geteuid() != 0:
        raise Unavailable("the compose tests start their own dockerd, which needs root")
    missing = sorted({pkg for path, pkg in NEEDED.items() if not os.access(path, os.X_OK)})
    if missing:
        raise Unavailable(
            f"missing Debian packages {' '.join(missing)}: scripts/system-packages.sh installs them"
        )


# --- the host's state that a daemon could change -----------------------------------------------


def _ip_forward() -> str:
    return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()


def _iptables_docker_rules() -> list[str]:
    rules: list[str] = []
    for table in ("filter", "nat"):
        listed = run(["iptables", "-t", table, "-S"], check=False)
        rules += [f"{table}: {r}" for r in listed.stdout.splitlines() if "DOCKER" in r]
    return rules


def _links() -> set[str]:
    return {p.name for p in Path("/sys/class/net").iterdir()}


class HostState:
    """What a dockerd could change on the host, taken before; `changes()` after."""

    def __init__(self) -> None:
        self.ip_forward = _ip_forward()
        self.iptables = _iptables_docker_rules()
        self.links = _links()

    def changes(self) -> list[str]:
        found = []
        if _ip_forward() != self.ip_forward:
            found.append(f"ip_forward is {_ip_forward()}, was {self.ip_forward}")
        added_rules = sorted(set(_iptables_docker_rules()) - set(self.iptables))
        if added_rules:
            found.append(f"iptables rules left: {added_rules}")
        added_links = sorted(_links() - self.links)
        if added_links:
            found.append(f"network links left: {added_links}")
        return found

    def restore(self) -> None:
        """Put back what a daemon changed anyway (ours is told not to touch any of it)."""
        if _ip_forward() != self.ip_forward:
            Path("/proc/sys/net/ipv4/ip_forward").write_text(self.ip_forward)
        for line in sorted(set(_iptables_docker_rules()) - set(self.iptables)):
            table, rule = line.split(": ", 1)
            words = shlex.split(rule)
            if words[0] == "-A":
                run(["iptables", "-t", table, "-D", *words[1:]], check=False)
        for line in sorted(set(_iptables_docker_rules()) - set(self.iptables)):
            table, rule = line.split(": ", 1)
            words = shlex.split(rule)
            if words[0] == "-N":
                run(["iptables", "-t", table, "-F", words[1]], check=False)
                run(["iptables", "-t", table, "-X", words[1]], check=False)
        for link in sorted(_links() - self.links):
            if link == "docker0" or link.startswith(("br-", "veth")):
                run(["ip", "link", "delete", link], check=False)


# --- name resolution ---------------------------------------------------------------------------


class DnsForwarder:
    """The containers' way to the host's resolver, on an address of the host they reach.

    The daemon runs without NAT (--iptables=false, --ip-forward=false), so Docker's
    embedded DNS cannot reach the host's nameserver from a container: each name it cannot
    answer itself, such as a stopped container's, waited about 20 s to fail (seen in
    every cluster run: `getent hosts` of the killed node from a survivor). RabbitMQ and
    the clients look up a killed node's name while it is down, and on a real network that
    fails at once. This forwards each query from the containers to the host's resolver
    and its answer back, so a missing name fails as fast as it would there.
    """

    def __init__(self) -> None:
        self.upstream = _host_nameserver()
        self.address = _source_address_towards(self.upstream)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind((self.address, 53))
        self._socket.settimeout(0.5)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                query, client = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(query, client), daemon=True).start()

    def _answer(self, query: bytes, client: tuple[str, int]) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
            upstream.settimeout(5)
            try:
                upstream.sendto(query, (self.upstream, 53))
                answer = upstream.recv(65535)
                self._socket.sendto(answer, client)
            except OSError:
                pass  # the container's resolver asks again


def _host_nameserver() -> str:
    for line in Path("/etc/resolv.conf").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and not parts[1].startswith("127."):
            return parts[1]
    raise Unavailable("/etc/resolv.conf names no nameserver the containers could be pointed at")


def _source_address_towards(address: str) -> str:
    """The host's own address on the route to `address` (containers reach it as the host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((address, 53))  # UDP: no packet is sent
        source: str = probe.getsockname()[0]
        return source


# --- the daemon ---------------------------------------------------------------------------------


class Dockerd:
    """A dockerd of its own; nothing shared with any other Docker on the machine."""

    def __init__(self, state_dir: Path, dns: str | None = None) -> None:
        self.state_dir = state_dir
        self.dns = dns
        self.data_root = state_dir / "data"
        # Unix socket paths are short: the exec root lives in /run.
        self.exec_root = Path("/run") / f"pct-{state_dir.name}"
        self.socket = self.exec_root / "docker.sock"
        self.pidfile = self.exec_root / "docker.pid"
        self.log_path = state_dir / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.env = {
            **_base_env(),
            "DOCKER_HOST": f"unix://{self.socket}",
            # docker-compose builds with Debian's docker CLI and its classic builder, as
            # `build_app_images` does: the same context, so the same cached layers.
            "DOCKER_BUILDKIT": "0",
            "COMPOSE_DOCKER_CLI_BUILD": "1",
        }

    def start(self, within: float = 60) -> None:
        if Path("/run/containerd/containerd.sock").exists():
            # dockerd would use that containerd instead of starting its own.
            raise Unavailable("a system containerd runs (/run/containerd): not sharing it")
        self.data_root.mkdir(parents=True)
        (self.state_dir / "owner").write_text(str(os.getpid()))
        self.exec_root.mkdir(parents=True)
        with self.log_path.open("wb") as log:  # the daemon holds its own copy
            self.process = self._spawn(log)
        deadline = time.monotonic() + within
        while run([DOCKER, "version"], env=self.env, check=False, timeout=10).returncode:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def _spawn(self, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                DOCKERD,
                f"--data-root={self.data_root}",
                f"--exec-root={self.exec_root}",
                f"--pidfile={self.pidfile}",
                f"--host=unix://{self.socket}",
                "--storage-driver=overlay2",
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--bridge=none",
                *([f"--dns={self.dns}"] if self.dns else []),
                "--log-level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_base_env(),
            start_new_session=True,
        )

    def docker(
        self, *args: str, timeout: float = 120, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run([DOCKER, *args], env=self.env, timeout=timeout, check=check, input=input)

    def remove_everything(self) -> None:
        """Every container, volume, network and image this daemon holds."""
        containers = self.docker("ps", "-aq", check=False).stdout.split()
        if containers:
            self.docker("rm", "-f", "-v", *containers, check=False, timeout=120)
        self.docker("network", "prune", "-f", check=False)
        self.docker("volume", "prune", "-f", check=False)
        self.docker("image", "prune", "-a", "-f", check=False, timeout=300)

    def stop(self, within: float = 60) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(within)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        _unmount_under(self.exec_root)
        _unmount_under(self.data_root)
        shutil.rmtree(self.exec_root, ignore_errors=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)


def _unmount_under(path: Path) -> None:
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(str(path))), reverse=True):
        run(["umount", "-l", mount], check=False)


def _remove_stale_sessions() -> None:
    """What a session killed outright (SIGKILL, a lost machine) left behind."""
    if not STATE_ROOT.exists():
        return
    for state_dir in STATE_ROOT.iterdir():
        with contextlib.suppress(FileNotFoundError, ValueError):
            owner = int((state_dir / "owner").read_text())
            if Path(f"/proc/{owner}").exists():
                continue  # a session that runs now, in another process
        pidfile = Path("/run") / f"pct-{state_dir.name}" / "docker.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(pidfile.read_text())
            if Path(f"/proc/{pid}/exe").resolve() == Path(DOCKERD):
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.2)
        say(f"removing a stale session's state {state_dir}")
        stale = Dockerd(state_dir)
        stale.stop()


# --- images ------------------------------------------------------------------------------------


def _proxy_args() -> list[str]:
    """Docker's predefined proxy build arguments, as the host has them (never cached)."""
    args = []
    for name in PASSED_ON:
        if name.lower().endswith("proxy") and os.environ.get(name):
            args += ["--build-arg", f"{name}={os.environ[name]}"]
    return args


def build_base(dockerd: Dockerd, workdir: Path) -> float:
    """Debian by debootstrap, trusting the host's CA bundle, imported as BASE_IMAGE."""
    started = time.monotonic()
    cached = os.environ.get("COMPOSE_TEST_BASE_TARBALL")
    tarball = Path(cached) if cached else workdir / "rootfs.tar"
    if not tarball.exists():
        rootfs = workdir / "rootfs"
        run(
            [
                DEBOOTSTRAP,
                "--variant=minbase",
                "--include=ca-certificates",
                SUITE,
                str(rootfs),
                MIRROR,
            ],
            env=_base_env(),
            timeout=600,
        )
        local_ca = rootfs / "usr/local/share/ca-certificates"
        local_ca.mkdir(parents=True, exist_ok=True)
        shutil.copy(HOST_CA_BUNDLE, local_ca / "build-host.crt")
        run(["chroot", str(rootfs), "update-ca-certificates"], env=_base_env())
        # The host's bundle is a superset of Debian's: it is the one builds must trust.
        shutil.copy(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / leftover).glob("*.deb"):
                entry.unlink()
        run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], timeout=300)
        shutil.rmtree(rootfs)
    with tarball.open("rb") as data:
        imported = subprocess.run(
            [DOCKER, "import", "-", BASE_IMAGE],
            stdin=data,
            env=dockerd.env,
            capture_output=True,
            timeout=300,
            check=False,
        )
    if imported.returncode:
        raise RuntimeError(f"docker import failed: {imported.stderr.decode()}")
    if not cached:
        tarball.unlink()
    return time.monotonic() - started


def _build_standin(dockerd: Dockerd, name: str, workdir: Path) -> float:
    started = time.monotonic()
    context = workdir / f"context-{STANDINS[name]}"
    shutil.copytree(STANDINS_DIR / STANDINS[name], context)
    if STANDINS[name] == "python":
        (context / "pip.conf").write_text(
            "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
            + "".join(
                f"{key} = {os.environ[env]}\n"
                for env, key in (
                    ("PIP_INDEX_URL", "index-url"),
                    ("PIP_EXTRA_INDEX_URL", "extra-index-url"),
                    ("PIP_TRUSTED_HOST", "trusted-host"),
                )
                if os.environ.get(env)
            )
        )
    dockerd.docker(
        "build",
        "--network",
        "host",
        "--build-arg",
        f"BASE={BASE_IMAGE}",
        *_proxy_args(),
        "-t",
        name,
        str(context),
        timeout=900,
    )
    return time.monotonic() - started


def build_standins(dockerd: Dockerd, names: Sequence[str], workdir: Path) -> dict[str, float]:
    """Each stand-in, built in parallel (the time goes on downloads); seconds per name."""
    unknown = [n for n in names if n not in STANDINS]
    if unknown:
        raise ValueError(f"no stand-in for {unknown}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(names)) as pool:
        futures = {n: pool.submit(_build_standin, dockerd, n, workdir) for n in names}
        return {n: f.result() for n, f in futures.items()}


def build_app_images(dockerd: Dockerd, compose_file: Path) -> dict[str, float]:
    """Build each image the compose file builds, as `docker compose build` would, but on
    the host's network: this daemon's compose networks reach nothing outside (no NAT), so
    the `--build` of `up` finds every layer here and builds from cache. Seconds per image.
    """
    services = yaml.safe_load(compose_file.read_text())["services"]
    built: dict[str, float] = {}
    for service in services.values():
        if "build" not in service or service["image"] in built:
            continue
        started = time.monotonic()
        build = service["build"]
        context = compose_file.parent / (build if isinstance(build, str) else build["context"])
        dockerd.docker(
            "build",
            "--network",
            "host",
            *_proxy_args(),
            "-t",
            service["image"],
            str(context),
            timeout=900,
        )
        built[service["image"]] = time.monotonic() - started
    return built


def images_named(compose_file: Path) -> dict[str, list[str]]:
    """Image name -> the services that use it, from the compose file and its Dockerfiles."""
    services = yaml.safe_load(compose_file.read_text())["services"]
    used: dict[str, list[str]] = {}
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            context = compose_file.parent / (build if isinstance(build, str) else build["context"])
            for line in (context / "Dockerfile").read_text().splitlines():
                if line.startswith("FROM "):
                    image = line.split()[1]
                    if not any(image == s.split()[-1] for s in _stage_names(context)):
                        used.setdefault(image, []).append(name)
        elif "image" in service:
            used.setdefault(service["image"], []).append(name)
    return used


def _stage_names(context: Path) -> list[str]:
    return [
        line
        for line in (context / "Dockerfile").read_text().splitlines()
        if line.startswith("FROM ") and " AS " in line
    ]


# --- compose projects --------------------------------------------------------------------------


class Project:
    """One docker-compose project on `dockerd`, its own name, its own environment."""

    def __init__(
        self,
        dockerd: Dockerd,
        name: str,
        compose_file: Path,
        env: dict[str, str] | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.dockerd = dockerd
        self.name = name
        self.compose_file = compose_file
        self.env = {
            **dockerd.env,
            "COMPOSE_PROJECT_NAME": name,
            "COMPOSE_FILE": str(compose_file),
            **(env or {}),
        }
        self.shim_dir = Path(tempfile.mkdtemp(prefix=f"{name}-bin-", dir=workdir))
        shim = self.shim_dir / "docker"
        # README says `docker compose …` (v2); Debian has the v1 CLI: same commands.
        shim.write_text(
            "#!/bin/sh\n"
            f'if [ "$1" = compose ]; then shift; exec {COMPOSE} "$@"; fi\n'
            f'exec {DOCKER} "$@"\n'
        )
        shim.chmod(0o755)

    def compose(
        self,
        *args: str,
        timeout: float = 300,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [COMPOSE, "--no-ansi", *args],
            env={**self.env, **(env or {})},
            timeout=timeout,
            check=check,
            cwd=self.compose_file.parent,
        )

    def shell_env(self) -> dict[str, str]:
        """For a reader's shell: `docker compose` is this project."""
        return {**self.env, "PATH": f"{self.shim_dir}:{self.env['PATH']}"}

    def up(self, *services: str, args: Sequence[str] = (), timeout: float = 600) -> None:
        self.compose("up", "-d", *args, *services, timeout=timeout)

    def containers(self, service: str | None = None) -> list[str]:
        """Ids of the project's containers (of `service`), running or not; asked of the
        daemon directly, which is much quicker than a `docker-compose ps` each time."""
        filters = [f"label=com.docker.compose.project={self.name}",
                   "label=com.docker.compose.oneoff=False"]  # fmt: skip
        if service:
            filters.append(f"label=com.docker.compose.service={service}")
        listed = self.dockerd.docker("ps", "-a", "-q", *(f"--filter={f}" for f in filters))
        return listed.stdout.split()

    def inspect_all(self, containers: Sequence[str]) -> list[dict[str, Any]]:
        if not containers:
            return []
        data: list[dict[str, Any]] = json.loads(self.dockerd.docker("inspect", *containers).stdout)
        return data

    def inspect(self, container: str) -> dict[str, Any]:
        return self.inspect_all([container])[0]

    def service_of(self, container: str) -> str:
        labels: dict[str, str] = self.inspect(container)["Config"]["Labels"]
        return labels["com.docker.compose.service"]

    def ip(self, service: str) -> str:
        [container, *_] = self.containers(service)
        networks = self.inspect(container)["NetworkSettings"]["Networks"]
        address: str = next(iter(networks.values()))["IPAddress"]
        return address

    def states(self) -> dict[str, str]:
        """Container name -> `running (healthy)`, `exited (0)`…"""
        states = {}
        for info in self.inspect_all(self.containers()):
            state = info["State"]
            text = state["Status"]
            if state["Status"] == "exited":
                text += f" ({state['ExitCode']})"
            elif "Health" in state:
                text += f" ({state['Health']['Status']})"
            states[info["Name"].lstrip("/")] = text
        return states

    def wait_healthy(
        self,
        services: Sequence[str],
        *,
        within: float = 300,
        completed: Sequence[str] = ("migrate",),
    ) -> float:
        """Until every container of `services` runs healthy (those with a healthcheck) and
        every one of `completed` exited 0; seconds it took. Fails on an exit != 0."""
        started = time.monotonic()
        while True:
            by_service: dict[str, list[dict[str, Any]]] = {s: [] for s in services}
            for info in self.inspect_all(self.containers()):
                service = info["Config"]["Labels"]["com.docker.compose.service"]
                if service in by_service:
                    by_service[service].append(info["State"])
            problems = []
            for service, states in by_service.items():
                if not states:
                    problems.append(f"{service}: no container")
                for state in states:
                    if service in completed:
                        if state["Status"] == "exited" and state["ExitCode"] != 0:
                            logs = self.compose("logs", "--tail=40", service, check=False).stdout
                            raise AssertionError(f"{service} exited {state['ExitCode']}:\n{logs}")
                        if state["Status"] != "exited":
                            problems.append(f"{service}: {state['Status']}")
                    elif state["Status"] != "running":
                        problems.append(f"{service}: {state['Status']}")
                    elif state.get("Health", {}).get("Status", "healthy") != "healthy":
                        problems.append(f"{service}: {state['Health']['Status']}")
            if not problems:
                return time.monotonic() - started
            if time.monotonic() - started > within:
                raise AssertionError(f"not healthy within {within}s: {problems}\n{self.states()}")
            time.sleep(0.5)

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service, check=False).stdout

    def down(self, *, volumes: bool = True) -> None:
        self.compose(
            "down",
            "--remove-orphans",
            *(["-v"] if volumes else []),
            "-t",
            "20",
            check=False,
            timeout=300,
        )

    def close(self) -> None:
        """Down with its volumes, and its shim gone: nothing of the project is left."""
        self.down(volumes=True)
        shutil.rmtree(self.shim_dir, ignore_errors=True)


# --- the session -------------------------------------------------------------------------------


class _Interrupted(BaseException):
    pass


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise _Interrupted(f"signal {signum}")


@contextlib.contextmanager
def _one_session_at_a_time() -> Iterator[None]:
    """Two sessions at once would collide on what the host shares: both daemons pick
    their compose networks' subnets from the same default pools (the same routes on two
    bridges), and each session, checking at its end that the host has no link it did
    not have before, would take the other's bridges and veths for its own leftovers and
    delete them. So a session waits for the one before it (the kernel drops the lock of
    a session killed outright)."""
    with SESSION_LOCK.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another compose session runs on this machine: waiting until it ends")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def docker_session(workdir: Path) -> Iterator[Dockerd]:
    """A private dockerd for the block; afterwards nothing of it is left (see module doc)."""
    check_available()
    with _one_session_at_a_time():
        yield from _session(workdir)


def _session(workdir: Path) -> Iterator[Dockerd]:
    _remove_stale_sessions()
    host = HostState()
    state_dir = STATE_ROOT / uuid.uuid4().hex[:8]
    dns = DnsForwarder()
    dockerd = Dockerd(state_dir, dns=dns.address)
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        dns.start()
        dockerd.start()
        yield dockerd
    finally:
        try:
            if dockerd.process is not None and dockerd.process.poll() is None:
                dockerd.remove_everything()
        finally:
            dockerd.stop()
            dns.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
            left = host.changes()
            if left:
                say(f"putting back what the daemon changed: {left}")
                host.restore()
            still = host.changes()
            if still:
                raise RuntimeError(f"the host was not put back: {still}")
