"""``s3://`` URLs, read and written through a command-line client: s5cmd when it is on PATH, else the AWS CLI.

A shard becomes a ``pipe:`` command (``s5cmd cat URL`` / ``aws s3 cp URL -``) that the shard reader
runs; a directory prefix (``s3://bucket/train/``) is read like a local shard directory, through its
``_info.json``. The endpoint comes from ``S3_ENDPOINT_URL``, else ``AWS_ENDPOINT_URL``, and is passed
to the client as ``--endpoint-url``: s5cmd 2.3 reads only the first variable and the AWS CLI only the
second, so either one works with either client. Credentials are the clients' own (environment,
``~/.aws``). The shard writer uploads through :func:`upload_file` (retried: one failed request must not
end a day-long write) and removes its bookkeeping objects with :func:`delete_object`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import time
from typing import Any
from urllib.parse import urlsplit

from selfdistill.data.folder import BadDataError
from selfdistill.data.shard_format import FORMAT, INFO_NAME

__all__ = ["ENDPOINT_VARIABLES", "ObjectStoreError", "check_credentials", "check_endpoint", "client_command",
           "delete_object", "endpoint", "is_prefix", "read_object", "read_remote_info", "remote_shard_urls", "to_pipe",
           "upload_file"]

ENDPOINT_VARIABLES = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")  # in this order of precedence


class ObjectStoreError(BadDataError):
    """The object store cannot be reached, or an object cannot be read (the client's message)."""


def endpoint() -> tuple[str, str]:
    """(endpoint URL, the variable it came from); ("", "") for the client's default (AWS)."""
    for name in ENDPOINT_VARIABLES:
        if os.environ.get(name, "").strip():
            return os.environ[name].strip(), name
    return "", ""


def _client(url: str) -> tuple[list[str], list[str]]:
    """(the client with its endpoint flag, the sub-command prefix: ``[]`` for s5cmd, ``["s3"]`` for aws)."""
    ep, _ = endpoint()
    flag = ["--endpoint-url", ep] if ep else []
    if shutil.which("s5cmd"):
        return ["s5cmd", *flag], []
    if shutil.which("aws"):
        return ["aws", *flag], ["s3"]
    raise ObjectStoreError(f"{url}: reading or writing s3:// objects needs s5cmd or the AWS CLI on PATH")


def client_command(url: str) -> list[str]:
    """The command that writes the object ``url`` to stdout."""
    base, sub = _client(url)
    return [*base, "cat", url] if not sub else [*base, *sub, "cp", url, "-"]


def to_pipe(url: str) -> str:
    """``url`` as the ``pipe:`` command the shard reader runs (other URLs unchanged)."""
    return "pipe:" + shlex.join(client_command(url)) if url.startswith("s3://") else url


AWS_ENDPOINT = "https://s3.amazonaws.com"  # where the clients go when no endpoint variable is set
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
DENIED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "(403)", "status code: 403", "Forbidden")
INSTANCE_METADATA = ("169.254.169.254", 80)  # an EC2 instance's role credentials


def check_endpoint(timeout: float = 5.0) -> None:
    """Fail in seconds, naming the variable, when the object store does not answer: an explicit
    endpoint, or AWS S3 itself when none is set (a forgotten ``S3_ENDPOINT_URL`` for MinIO / Ceph);
    the clients would retry for a minute or more per object before they say so. Then :func:`check_credentials`."""
    ep, name = endpoint()
    target = ep or AWS_ENDPOINT
    parts = urlsplit(target if "://" in target else f"http://{target}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
    except OSError as err:
        why = err.strerror or type(err).__name__
        if ep:
            raise ObjectStoreError(f"{name}={ep}: the object store does not answer ({why})") from None
        raise ObjectStoreError(f"s3://: neither {' nor '.join(ENDPOINT_VARIABLES)} is set, so AWS S3 itself "
                               f"({target}) is asked, and it does not answer ({why}); set S3_ENDPOINT_URL="
                               f"http://HOST:PORT for another object store (MinIO, Ceph...)") from None
    check_credentials()


def check_credentials() -> None:
    """Fail at once when the clients would find no credentials (s5cmd and the AWS CLI would first
    try the instance metadata service for a while, then fail with a message about it)."""
    if any(os.environ.get(v, "").strip() for v in CREDENTIAL_VARIABLES):
        return
    home = os.path.expanduser("~")
    files = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(home, ".aws", "credentials"),
             os.environ.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config")]
    if any(os.path.isfile(f) for f in files):
        return
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
        try:
            socket.create_connection(INSTANCE_METADATA, timeout=1).close()
            return
        except OSError:
            pass
    raise ObjectStoreError("s3://: no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                           f"(or AWS_PROFILE with {files[0]})")


def is_prefix(path: str) -> bool:
    """An ``s3://`` path that names a directory (no brace pattern, not a ``.tar``)."""
    return path.startswith("s3://") and "{" not in path and "::" not in path and not path.endswith(".tar")


def _run(command: list[str], url: str, timeout: float = 300) -> bytes:
    """Run a client command; its stdout, or a one-line error with the client's last message."""
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ObjectStoreError(f"{url}: {command[0]} gave no answer in {timeout:g} s") from None
    if done.returncode:
        lines = [line.strip() for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
        raise ObjectStoreError(f"{url}: {command[0]} failed (exit {done.returncode}): "
                                f"{lines[-1] if lines else 'no message'}")
    return done.stdout


def read_object(url: str) -> bytes:
    """The whole object ``url``; a one-line error with the client's last message if it fails."""
    check_endpoint()
    return _run(client_command(url), url)


def upload_file(path: str | os.PathLike, url: str, retries: int = 3, backoff_s: float = 1.0) -> None:
    """Copy a local file to the object ``url``, trying ``retries`` more times (waits of ``backoff_s``,
    doubling) before the last failure's one-line error."""
    check_endpoint()
    base, sub = _client(url)
    for attempt in range(retries + 1):
        try:
            _run([*base, *sub, "cp", os.fspath(path), url], url, timeout=3600)
            return
        except ObjectStoreError:
            if attempt == retries:
                raise
            time.sleep(backoff_s * 2 ** attempt)


def delete_object(url: str) -> None:
    """Remove the object ``url``."""
    base, sub = _client(url)
    _run([*base, *sub, "rm", url], url)


def read_remote_info(prefix: str) -> dict[str, Any]:
    """``_info.json`` of a shard directory uploaded under ``prefix``."""
    url = f"{prefix.rstrip('/')}/{INFO_NAME}"
    check_endpoint()  # its own error, not a missing file
    try:
        data = read_object(url)
    except ObjectStoreError as err:
        if any(word in str(err) for word in DENIED):  # the credentials, not a missing file
            raise ObjectStoreError(f"data.path: {prefix}: the object store refuses these credentials "
                                   f"(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE): {err}") from None
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
