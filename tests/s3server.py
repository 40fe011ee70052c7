"""A local S3 server for the tests that put a run directory on object storage: moto's
server speaks the real protocol, on 127.0.0.1 and a free port."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest


def aws_env(endpoint: str) -> dict[str, str]:
    """The AWS variables that point a job, its Ray workers and pyarrow at the server."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[str]:
    """A moto S3 server with ``bucket`` created; yields its URL and stops it after."""
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=url, region="us-east-1", access_key="testing", secret_key="testing",
                          allow_bucket_creation=True).create_dir(bucket)
        yield url
    finally:
        server.stop()
