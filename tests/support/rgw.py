"""A throwaway Ceph RADOS Gateway on loopback: a real S3 server for the tests and benchmarks.

:class:`LocalRGW` starts a single-node Ceph cluster (one monitor, one memstore OSD, pool size 1,
no auth, msgr2 only) and a radosgw bound to 127.0.0.1, started in seconds and removed without a
trace. Needs the Debian packages radosgw, ceph-mon and ceph-osd (.ci/install-rgw.sh).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RGW_BINARIES = ("monmaptool", "ceph-mon", "ceph-osd", "ceph", "radosgw", "radosgw-admin")


def rgw_unavailable_reason() -> str | None:
    """Why :class:`LocalRGW` cannot start here (None when the binaries are installed)."""
    missing = [b for b in RGW_BINARIES if shutil.which(b) is None]
    if missing:
        return (f"Ceph RADOS Gateway not installed (missing {', '.join(missing)}); "
                f"run .ci/install-rgw.sh (apt-get install radosgw ceph-mon ceph-osd)")
    return None


class LocalRGW:
    """A single-node Ceph RADOS Gateway on 127.0.0.1 in a temporary directory.

    ``with LocalRGW() as rgw: rgw.env`` gives the environment variables (endpoint and the test
    user's keys) that point boto3, s3fs and mosaicml-streaming at it. ``stop()`` kills exactly the
    daemons it started (by their pid files) and removes the directory.
    """

    ACCESS_KEY = "crossflow-test-access"
    SECRET_KEY = "crossflow-test-secret"

    def __init__(self, start_timeout: float = 90.0, memstore_bytes: int = 2 << 30):
        self.start_timeout = start_timeout
        self.memstore_bytes = memstore_bytes
        self.dir: Path | None = None
        self.port: int | None = None
        self._pids: list[int] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
                "S3_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def _conf(self, mon_port: int) -> str:
        d, fsid = self.dir, self.fsid
        return f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
ms bind msgr1 = false
ms bind msgr2 = true
ms mon client mode = crc secure
ms client mode = crc secure
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
mon data = {d}/mon/$id
osd data = {d}/osd/$id
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{self.port}
"""

    def _run(self, *args: str, timeout: float = 60) -> str:
        out = subprocess.run([*args, "-c", str(self.dir / "ceph.conf")] if args[0] != "monmaptool" else list(args),
                             capture_output=True, text=True, timeout=timeout, cwd=self.dir)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])} failed ({out.returncode}): {out.stderr[-2000:]}")
        return out.stdout

    def start(self) -> "LocalRGW":
        reason = rgw_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self.dir = Path(tempfile.mkdtemp(prefix="crossflow-rgw-"))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        d = self.dir
        for sub in ("mon", "osd/0", "run", "log"):
            (d / sub).mkdir(parents=True)
        self.fsid = str(uuid.uuid4())
        mon_port, self.port = _free_port(), _free_port()
        (d / "ceph.conf").write_text(self._conf(mon_port))
        self._run("monmaptool", "--create", "--add", "a", f"v2:127.0.0.1:{mon_port}", "--fsid", self.fsid,
                  str(d / "monmap"))
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(d / "monmap"))
        self._run("ceph-mon", "-i", "a")  # daemonizes; pid file in run/
        self._run("ceph", "osd", "create")
        self._run("ceph-osd", "-i", "0", "--mkfs")
        self._run("ceph-osd", "-i", "0")
        self._run("radosgw", "-n", "client.rgw")
        self._collect_pids()
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"radosgw did not answer on {self.endpoint} within {self.start_timeout:.0f} s; "
                                       f"logs in {d / 'log'}")
                self._collect_pids()
                time.sleep(0.5)
        self._collect_pids()
        self._run("radosgw-admin", "user", "create", "--uid=crossflow-test", "--display-name=crossflow-test",
                  f"--access-key={self.ACCESS_KEY}", f"--secret-key={self.SECRET_KEY}")

    def _collect_pids(self) -> None:
        for pidfile in (self.dir / "run").glob("*.pid"):
            try:
                pid = int(pidfile.read_text().strip())
            except ValueError:
                continue
            if pid not in self._pids:
                self._pids.append(pid)

    def create_bucket(self, name: str) -> str:
        import boto3
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.ACCESS_KEY,
                     aws_secret_access_key=self.SECRET_KEY, region_name="us-east-1").create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.dir is not None and (self.dir / "run").exists():
            self._collect_pids()
        for pid in reversed(self._pids):  # rgw, osd, then mon
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for pid in self._pids:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._pids = []
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "LocalRGW":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
