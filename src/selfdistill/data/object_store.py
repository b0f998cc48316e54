"""``s3://`` URLs, read through a command-line client: s5cmd when it is on PATH, else the AWS CLI.

A shard becomes a ``pipe:`` command (``s5cmd cat URL`` / ``aws s3 cp URL -``) that the shard reader
runs; a directory prefix (``s3://bucket/train/``) is read like a local shard directory, through its
``_info.json``. The endpoint comes from ``S3_ENDPOINT_URL``, else ``AWS_ENDPOINT_URL``, and is passed
to the client as ``--endpoint-url``: s5cmd 2.3 reads only the first variable and the AWS CLI only the
second, so either one works with either client. Credentials are the clients' own (environment,
``~/.aws``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
from typing import Any
from urllib.parse import urlsplit

from selfdistill.data.folder import BadDataError
from selfdistill.data.shard_format import FORMAT, INFO_NAME

__all__ = ["ENDPOINT_VARIABLES", "ObjectStoreError", "check_endpoint", "client_command", "endpoint", "is_prefix",
           "read_object", "read_remote_info", "remote_shard_urls", "to_pipe"]

ENDPOINT_VARIABLES = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")  # in this order of precedence


class ObjectStoreError(BadDataError):
    """The object store cannot be reached, or an object cannot be read (the client's message)."""


def endpoint() -> tuple[str, str]:
    """(endpoint URL, the variable it came from); ("", "") for the client's default (AWS)."""
    for name in ENDPOINT_VARIABLES:
        if os.environ.get(name, "").strip():
            return os.environ[name].strip(), name
    return "", ""


def client_command(url: str) -> list[str]:
    """The command that writes the object ``url`` to stdout."""
    ep, _ = endpoint()
    flag = ["--endpoint-url", ep] if ep else []
    if shutil.which("s5cmd"):
        return ["s5cmd", *flag, "cat", url]
    if shutil.which("aws"):
        return ["aws", *flag, "s3", "cp", url, "-"]
    raise ObjectStoreError(f"{url}: reading s3:// shards needs s5cmd or the AWS CLI on PATH")


def to_pipe(url: str) -> str:
    """``url`` as the ``pipe:`` command the shard reader runs (other URLs unchanged)."""
    return "pipe:" + shlex.join(client_command(url)) if url.startswith("s3://") else url


def check_endpoint() -> None:
    """Fail in a second, naming the variable, when an explicit endpoint refuses connections: the
    clients retry for up to a minute per shard (s5cmd: 10 retries) before they say so."""
    ep, name = endpoint()
    if not ep:
        return
    parts = urlsplit(ep if "://" in ep else f"http://{ep}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=10).close()
    except OSError as err:
        raise ObjectStoreError(f"{name}={ep}: the object store does not answer "
                              f"({err.strerror or type(err).__name__})") from None


def is_prefix(path: str) -> bool:
    """An ``s3://`` path that names a directory (no brace pattern, not a ``.tar``)."""
    return path.startswith("s3://") and "{" not in path and "::" not in path and not path.endswith(".tar")


def read_object(url: str) -> bytes:
    """The whole object ``url``; a one-line error with the client's last message if it fails."""
    check_endpoint()
    command = client_command(url)
    try:
        done = subprocess.run(command, capture_output=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise ObjectStoreError(f"{url}: {command[0]} gave no answer in 300 s") from None
    if done.returncode:
        lines = [line.strip() for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
        raise ObjectStoreError(f"{url}: {command[0]} failed (exit {done.returncode}): "
                                f"{lines[-1] if lines else 'no message'}")
    return done.stdout


def read_remote_info(prefix: str) -> dict[str, Any]:
    """``_info.json`` of a shard directory uploaded under ``prefix``."""
    url = f"{prefix.rstrip('/')}/{INFO_NAME}"
    check_endpoint()  # its own error, not a missing file
    try:
        data = read_object(url)
    except ObjectStoreError as err:
        raise ObjectStoreError(f"data.path: {prefix} is read as a shard directory, which needs its {INFO_NAME} "
                                f"(upload the whole directory selfdistill-shards wrote, or give a brace pattern "
                                f"such as {prefix.rstrip('/')}/shard-{{000000..000009}}.tar): {err}") from None
    try:
        info = json.loads(data)
    except ValueError as err:
        raise ObjectStoreError(f"{url}: not JSON ({err})") from None
    if info.get("format") != FORMAT:
        raise ValueError(f"{url} has format {info.get('format')!r}, expected {FORMAT!r}")
    return info


def remote_shard_urls(prefix: str, info: dict[str, Any]) -> list[str]:
    """The ``s3://`` URLs of the shards ``info`` lists, in write order."""
    return [f"{prefix.rstrip('/')}/{s['name']}" for s in info["shards"]]
