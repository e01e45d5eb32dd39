"""Shared fixtures: a real local Ray, a real local S3 server (moto), small tars on disk."""
from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

S3_KEY, S3_SECRET, S3_REGION = "testing", "testing", "us-east-1"
# Credentials come from the environment (never from replica's config); set before Ray starts so
# its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", S3_KEY)
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", S3_SECRET)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    ray.init(
        num_cpus=2,
        object_store_memory=400 * 1024 * 1024,
        include_dashboard=False,
        _temp_dir=temp_dir,
        ignore_reinit_error=True,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1 with a fresh bucket; yields a Storage."""
    from moto.server import ThreadedMotoServer

    from pipeline.storage import Storage

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    storage = Storage(endpoint_url=f"http://{host}:{port}", region=S3_REGION)
    import boto3

    boto3.client(
        "s3", endpoint_url=storage.endpoint_url, region_name=S3_REGION,
        aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
    ).create_bucket(Bucket="replica-test")
    yield storage
    server.stop()
