"""No secret ends up in what a run writes: the tiny job with run_dir on S3 (moto's server on
127.0.0.1) and tracking=mlflow, under an AWS secret key, an MLflow token and a Ray auth token
set to strings found nowhere else, leaves none of them in the bucket, the MLflow store, the
job's output, Ray's logs or any other file it wrote."""

from __future__ import annotations

import gzip
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest
from test_storage import BUCKET, E2E_JOB, _run_job, s3_env  # noqa: F401  (s3_env: the module's S3 server)

from engine import storage


def _text_of(name: str, data: bytes) -> bytes:
    """What a reader of the file sees: gzip opened, Parquet's compressed pages decoded."""
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    elif name.endswith(".parquet"):
        import io

        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        readable = table.drop_columns([c for c in ("image",) if c in table.column_names])
        data += str(readable.to_pylist()).encode() + str(table.schema.metadata).encode()
    return data


def _local_files(*folders: Path):
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink() and not path.is_socket():
                yield str(path), path.read_bytes()


def _bucket_files(prefix: str):
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], region="us-east-1")
    for info in fs.get_file_info(pafs.FileSelector(prefix, recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as stream:
                yield f"s3://{info.path}", stream.read()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_no_secret_in_any_file_a_run_writes(s3_env, tmp_path):  # noqa: F811
    planted = {
        "AWS_SECRET_ACCESS_KEY": f"aws-secret-{secrets.token_hex(12)}",
        "MLFLOW_TRACKING_TOKEN": f"mlflow-token-{secrets.token_hex(12)}",
        "RAY_AUTH_TOKEN": f"ray-token-{secrets.token_hex(12)}",
    }
    # A short folder for Ray's session (its socket paths have a length limit), searched as logs.
    ray_tmp = Path(tempfile.mkdtemp(prefix="fs-sec-"))
    store, cache, workdir = tmp_path / "mlruns", tmp_path / "cache", tmp_path / "cwd"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(planted, RAY_AUTH_MODE="token", RAY_TMPDIR=str(ray_tmp), MLFLOW_TRACKING_URI=store.as_uri(),
               MLFLOW_ALLOW_FILE_STORE="true", **{storage.CACHE_ENV: str(cache)})
    run_dir = f"s3://{BUCKET}/secrets-run"
    out = _run_job(run_dir, ["tracking=mlflow", "ray.num_cpus=2"], env, workdir, tmp_path / "job.log")
    assert list(store.rglob("report.html")), "the run was not logged to MLflow"
    files = [*_bucket_files(f"{BUCKET}/secrets-run"), *_local_files(store, cache, workdir, ray_tmp),
             ("job output", out.encode())]
    assert any(name.endswith("results.json") for name, _ in files) and len(files) > 50
    leaks = [(name, key) for name, data in files for key, value in planted.items()
             if value.encode() in _text_of(name, data)]
    assert not leaks, f"{leaks} (Ray's session folder is kept: {ray_tmp})"
    shutil.rmtree(ray_tmp, ignore_errors=True)
