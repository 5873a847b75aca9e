"""Run the compose topology on loopback from the real programs: replicas, nginx and Prometheus.

Where there is no Docker engine, this starts what ``docker/compose.yaml`` describes as
plain processes in one folder: ``--replicas`` ``matlora serve`` processes on free ports,
nginx in front of them and Prometheus scraping each one. nginx and Prometheus read the
same files as under compose: ``nginx/matlora.conf.template`` rendered with the same
variable, and ``prometheus/prometheus.yml`` copied unchanged. Only the replica addresses,
the ports and the run-time paths differ. Grafana is not started.

Usage (from the repository root, with the project's virtual environment)::

    .venv/bin/python docker/local_stack.py                      # the embedded model and adapter
    .venv/bin/python docker/local_stack.py --port 8080 -- --base DIR --adapter toy=ADAPTER_DIR

Everything after ``--`` is passed to every ``matlora serve``. The script prints the
addresses and runs until Ctrl-C, SIGTERM or SIGHUP (also during start-up), then stops
every process it started: nginx first, letting the requests in flight finish, then the
replicas, then Prometheus. A replica that exits on its own is logged, and the stack goes
on with the others. Needs the ``nginx`` and ``prometheus`` programs (Debian packages of
the same names); runs as any user.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

logger = logging.getLogger("local_stack")

DOCKER_DIR = Path(__file__).resolve().parent
REPO_ROOT = DOCKER_DIR.parent
NGINX_TEMPLATE = DOCKER_DIR / "nginx" / "matlora.conf.template"
PROMETHEUS_CONFIG = DOCKER_DIR / "prometheus" / "prometheus.yml"
# The file names that matlora.conf.template and prometheus.yml expect beside them.
NGINX_UPSTREAMS_NAME = "matlora-upstreams.conf"
# nginx listens on loopback only, like the ports that compose publishes by default.
NGINX_ADDRESS = "127.0.0.1"
PROMETHEUS_TARGETS_NAME = "targets/replicas.json"

_PLACEHOLDER = re.compile(r"\$\{(MATLORA_[A-Z0-9_]+)\}")


@dataclass
class Service:
    """One child process, started in its own session.

    Its stderr goes to ``log_path``, and so does its stdout unless ``stdout_path`` is set.
    """

    name: str
    command: list[str]
    log_path: Path
    stdout_path: Path | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, env: dict[str, str] | None = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as files:
            log = files.enter_context(self.log_path.open("ab"))
            stdout = files.enter_context(self.stdout_path.open("ab")) if self.stdout_path else log
            # A session of its own: Ctrl-C in the terminal reaches this script only,
            # which then stops the children in order.
            self.process = subprocess.Popen(self.command, stdout=stdout, stderr=log, env=env, start_new_session=True)
        logger.info("started %s (pid %d): %s", self.name, self.process.pid, " ".join(self.command))

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        if self.running:
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        """Wait for the process to exit and return its exit code, or None after ``timeout`` seconds."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float, signum: int = signal.SIGTERM) -> int | None:
        """Send ``signum``, wait up to ``timeout`` seconds, then SIGKILL; return the exit code.

        SIGKILL goes to the whole session, so that no child of the process (nginx's
        workers, say) is left holding a port. Returns None for a process that was never
        started.
        """
        if self.process is None:
            return None
        if self.running:
            self.send_signal(signum)
            if self.wait(timeout) is None:
                logger.warning("%s did not exit %.0f s after signal %d; killing it", self.name, timeout, signum)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        logger.info("stopped %s (exit code %s)", self.name, self.process.returncode)
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Replica(Service):
    """A ``matlora serve`` process, named like its compose service (``server-1``, ...)."""

    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"


class StackError(RuntimeError):
    """A process of the stack failed to start or to become ready; the message has its log tail."""


class StartInterrupted(Exception):
    """:meth:`LocalStack.request_stop` was called while the stack was starting."""


class LocalStack:
    """The replicas, nginx and Prometheus of compose.yaml, as processes under ``workdir``.

    Args:
        workdir: folder for the rendered configs, Prometheus' data and every log.
        serve_args: extra arguments for each ``matlora serve``, e.g. ``["--base", DIR]``.
        replicas: how many replicas to start.
        nginx_port, prometheus_port: ports on 127.0.0.1; a free one when None.
        graceful_timeout: each replica's ``--graceful-timeout`` in seconds.
        start_timeout: seconds each process may take to become ready.

    Example:
        >>> with LocalStack(Path("/tmp/stack"), ["--base", tiny_dir]) as stack:  # doctest: +SKIP
        ...     httpx.post(stack.url + "/generate", json={"prompt": "1+1=", "rank": 4})
    """

    def __init__(
        self,
        workdir: Path,
        serve_args: Sequence[str] = (),
        replicas: int = 2,
        nginx_port: int | None = None,
        prometheus_port: int | None = None,
        graceful_timeout: float = 30.0,
        start_timeout: float = 300.0,
    ) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        self.workdir = Path(workdir)
        self.serve_args = list(serve_args)
        self.graceful_timeout = graceful_timeout
        self.start_timeout = start_timeout
        self.nginx_port = nginx_port or free_port()
        self.prometheus_port = prometheus_port or free_port()
        self.stop_requested = False
        self.nginx_dir = self.workdir / "nginx"
        self.prometheus_dir = self.workdir / "prometheus"
        self.logs_dir = self.workdir / "logs"
        self.replicas = [self._replica(index) for index in range(1, replicas + 1)]
        self.nginx = Service(
            "nginx",
            nginx_command(self.nginx_dir),
            self.logs_dir / "nginx-error.log",
            stdout_path=self.logs_dir / "nginx-access.log",
        )
        self.prometheus = Service("prometheus", self._prometheus_command(), self.logs_dir / "prometheus.log")
        self._reported_exits: set[str] = set()

    @property
    def url(self) -> str:
        """The load balancer's address."""
        return f"http://127.0.0.1:{self.nginx_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def nginx_access_log(self) -> Path:
        """nginx's access log: one JSON object per request (see matlora.conf.template)."""
        return self.nginx.stdout_path

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Write the configs, start every process and wait until each is ready.

        Raises:
            StackError: a process exited or timed out before it was ready.
            StartInterrupted: :meth:`request_stop` was called meanwhile.
            Either way, every process started so far is stopped first.
        """
        started = time.perf_counter()
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_nginx_config(
            self.nginx_dir, self.nginx_port, [replica.address for replica in self.replicas], address=NGINX_ADDRESS
        )
        write_prometheus_config(self.prometheus_dir, {replica.name: replica.address for replica in self.replicas})
        try:
            for replica in self.replicas:
                replica.start(_replica_env())
            for replica in self.replicas:
                self._wait_http(replica, replica.url + "/readyz")

            self.nginx.start()
            self._wait_http(self.nginx, self.url + "/readyz")

            self.prometheus.start()
            self._wait_http(self.prometheus, self.prometheus_url + "/-/ready")
            self._wait_until(self.prometheus, self._targets_up, "every replica is scraped")
        except BaseException:
            self.stop()
            raise
        logger.info("stack ready in %.1f s", time.perf_counter() - started)

    def stop(self) -> None:
        """Stop nginx, then the replicas, then Prometheus, so that no request in flight is lost.

        nginx gets SIGQUIT: it closes its port and waits up to ``graceful_timeout``
        seconds for the requests it is proxying. The replicas then get SIGTERM and drain,
        and Prometheus goes last. A process that outlives its wait is killed.
        """
        self.nginx.stop(timeout=self.graceful_timeout, signum=signal.SIGQUIT)
        for replica in self.replicas:
            replica.send_signal(signal.SIGTERM)
        for replica in self.replicas:
            replica.stop(timeout=self.graceful_timeout + 10)
        self.prometheus.stop(timeout=10)

    def request_stop(self) -> None:
        """Ask :meth:`start` to give up and :func:`main` to stop the stack; safe in a signal handler."""
        self.stop_requested = True

    def check(self) -> bool:
        """Log each process that exited since the last call, and return whether the stack can still serve.

        It can while nginx and at least one replica run. Call it on a started stack only,
        because a process that was never started counts as exited.
        """
        for service in [*self.replicas, self.nginx, self.prometheus]:
            if service.running or service.name in self._reported_exits:
                continue
            self._reported_exits.add(service.name)
            code = service.process.returncode if service.process is not None else None
            tail = service.log_tail()
            logger.error("%s exited unexpectedly (exit code %s); its log ends with:\n%s", service.name, code, tail)
            if isinstance(service, Replica):
                left = sum(replica.running for replica in self.replicas)
                logger.warning("%d of %d replicas are left; nginx sends the requests to them", left, len(self.replicas))
        return self.nginx.running and any(replica.running for replica in self.replicas)

    def describe(self) -> str:
        lines = [f"load balancer  {self.url}", f"prometheus     {self.prometheus_url}"]
        lines += [f"{replica.name:<14} {replica.url}" for replica in self.replicas]
        lines.append(f"logs           {self.logs_dir}")
        return "\n".join(lines)

    def _replica(self, index: int) -> Replica:
        name = f"server-{index}"
        port = free_port()
        command = [
            sys.executable, "-m", "matlora", "serve",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--graceful-timeout", str(self.graceful_timeout),
            *self.serve_args,
        ]  # fmt: skip
        return Replica(name, command, self.logs_dir / f"{name}.log", port=port)

    def _prometheus_command(self) -> list[str]:
        return [
            find_program("prometheus"),
            f"--config.file={self.prometheus_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.prometheus_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
        ]

    def _targets_up(self) -> bool:
        response = httpx.get(self.prometheus_url + "/api/v1/targets", params={"state": "active"}, timeout=5)
        targets = response.json()["data"]["activeTargets"]
        return len(targets) == len(self.replicas) and all(target["health"] == "up" for target in targets)

    def _wait_http(self, service: Service, url: str) -> None:
        def answers_200() -> bool:
            return httpx.get(url, timeout=5).status_code == 200

        self._wait_until(service, answers_200, f"{url} answers 200")

    def _wait_until(self, service: Service, condition: Callable[[], bool], description: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.stop_requested:
                raise StartInterrupted(f"stop requested while waiting until {description}")
            if not service.running:
                raise StackError(
                    f"{service.name} exited before {description}; its log ends with:\n{service.log_tail()}"
                )
            try:
                if condition():
                    logger.info("%s: %s", service.name, description)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise StackError(
            f"{service.name} timed out after {self.start_timeout:.0f} s waiting until {description}; "
            f"its log ends with:\n{service.log_tail()}"
        )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_program(name: str) -> str:
    """Return the path of ``name`` on PATH or in /usr/sbin and /sbin, where Debian installs nginx."""
    search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    path = shutil.which(name, path=search_path)
    if path is None:
        raise FileNotFoundError(f"{name} not found on PATH or in /usr/sbin; install it, e.g. apt-get install {name}")
    return path


def render_template(text: str, variables: dict[str, str]) -> str:
    """Replace each ``${MATLORA_*}`` placeholder, as the nginx image's envsubst step does.

    Raises:
        KeyError: a placeholder in ``text`` has no value in ``variables``.
    """
    missing = sorted(set(_PLACEHOLDER.findall(text)) - set(variables))
    if missing:
        raise KeyError(f"no value for template variable(s) {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda match: variables[match.group(1)], text)


def nginx_command(nginx_dir: Path) -> list[str]:
    """Return the command that runs nginx in the foreground on the config that :func:`write_nginx_config` wrote."""
    # "-e stderr": errors before nginx has read error_log go to the log file too,
    # instead of the packaged default path that only root may write.
    config = nginx_dir / "nginx.conf"
    return [find_program("nginx"), "-p", str(nginx_dir), "-c", str(config), "-e", "stderr"]


def nginx_main_config(nginx_dir: Path) -> str:
    """Return a main nginx.conf whose every writable path is under ``nginx_dir``.

    The nginx image has its own main config; this one plays its part in the local stack
    and includes the rendered ``conf.d/*.conf`` the same way.
    """
    temp = nginx_dir / "temp"
    lines = [
        "worker_processes 1;",
        "daemon off;",
        f"pid {nginx_dir / 'nginx.pid'};",
        "error_log stderr notice;",
        "events { worker_connections 1024; }",
        "http {",
        f"    client_body_temp_path {temp / 'client_body'};",
        f"    proxy_temp_path {temp / 'proxy'};",
        f"    fastcgi_temp_path {temp / 'fastcgi'};",
        f"    uwsgi_temp_path {temp / 'uwsgi'};",
        f"    scgi_temp_path {temp / 'scgi'};",
        f"    include {nginx_dir / 'conf.d'}/*.conf;",
        "}",
    ]
    if os.geteuid() == 0:
        # As root, nginx would run its workers as "nobody", which cannot enter a private
        # temporary folder. They run as the user who started the stack instead.
        lines.insert(0, f"user {pwd.getpwuid(os.geteuid()).pw_name};")
    return "\n".join(lines) + "\n"


def nginx_upstreams(replica_addresses: Sequence[str]) -> str:
    """Return the two upstream blocks that matlora.conf.template proxies to, as in nginx/matlora-upstreams.conf.

    ``matlora_replicas`` takes new requests; ``matlora_replay`` replays rejected ones and
    marks no replica as failed (``max_fails=0``). The template explains why.
    """
    lines = ["upstream matlora_replicas {", "    zone matlora_replicas 64k;"]
    lines += [f"    server {address};" for address in replica_addresses]
    lines += ["}", "upstream matlora_replay {", "    zone matlora_replay 64k;"]
    lines += [f"    server {address} max_fails=0;" for address in replica_addresses]
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_nginx_config(
    nginx_dir: Path, port: int, replica_addresses: Sequence[str], address: str = NGINX_ADDRESS
) -> None:
    """Write nginx.conf, conf.d/matlora.conf (the template, to listen on ``address:port``) and the upstreams."""
    (nginx_dir / "conf.d").mkdir(parents=True, exist_ok=True)
    (nginx_dir / "temp").mkdir(exist_ok=True)
    (nginx_dir / "nginx.conf").write_text(nginx_main_config(nginx_dir))
    variables = {"MATLORA_NGINX_ADDRESS": address, "MATLORA_NGINX_PORT": str(port)}
    (nginx_dir / "conf.d" / "matlora.conf").write_text(render_template(NGINX_TEMPLATE.read_text(), variables))
    (nginx_dir / NGINX_UPSTREAMS_NAME).write_text(nginx_upstreams(replica_addresses))


def write_prometheus_config(prometheus_dir: Path, replica_addresses: dict[str, str]) -> None:
    """Copy prometheus.yml unchanged and write the file-based targets it reads, one per replica."""
    targets = prometheus_dir / PROMETHEUS_TARGETS_NAME
    targets.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PROMETHEUS_CONFIG, prometheus_dir / "prometheus.yml")
    groups = [{"targets": [address], "labels": {"replica": name}} for name, address in replica_addresses.items()]
    targets.write_text(json.dumps(groups, indent=2) + "\n")


def _replica_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    # Replicas import the project from this checkout even when it is not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Start matlora replicas, nginx and Prometheus on 127.0.0.1, as docker/compose.yaml does.",
        epilog="Arguments after '--' go to every 'matlora serve', e.g. -- --base DIR --adapter NAME=DIR.",
    )
    parser.add_argument("--replicas", type=int, default=2, help="number of matlora serve replicas (default: 2)")
    parser.add_argument("--port", type=int, default=8080, help="load balancer port on 127.0.0.1 (default: 8080)")
    parser.add_argument("--prometheus-port", type=int, default=9090, help="Prometheus port (default: 9090)")
    parser.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds each replica may take to finish its requests after SIGTERM (default: 30)",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=300.0,
        help="seconds each process may take to become ready (default: 300)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="folder for configs, data and logs (default: a new temporary folder)"
    )
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_args[:1] == ["--"]:
        args.serve_args = args.serve_args[1:]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stack until a stop signal (exit status 0) or until it can no longer serve (1)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO, and the readiness polls are many.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="matlora-stack-"))
    try:
        stack = LocalStack(
            workdir,
            serve_args=args.serve_args,
            replicas=args.replicas,
            nginx_port=args.port,
            prometheus_port=args.prometheus_port,
            graceful_timeout=args.graceful_timeout,
            start_timeout=args.start_timeout,
        )
    except FileNotFoundError as error:
        logger.error("%s", error)
        return 1

    # SIGHUP too: a closed terminal must not leave the replicas and nginx running.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stack.request_stop())

    try:
        stack.start()
    except StartInterrupted:
        logger.info("stopped during start-up")
        return 0
    except (StackError, KeyError) as error:
        logger.error("%s", error)
        return 1
    sys.stdout.write(stack.describe() + "\nPress Ctrl-C to stop.\n")
    sys.stdout.flush()
    try:
        while not stack.stop_requested:
            if not stack.check():
                logger.error("no replica or no nginx is left; stopping the stack")
                return 1
            time.sleep(0.5)
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
