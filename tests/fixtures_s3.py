"""S3 for the tests: moto's threaded server on a loopback port, spoken to by real boto3 over
HTTP (not in-process ``mock_aws`` patching).

A pytest plugin: list it in ``pytest_plugins``. Fixtures:

* ``moto_server`` (session): the endpoint URL, with fake AWS credentials in the environment
  for the whole session (child processes inherit them).
* ``s3_bucket``: a fresh, uniquely named, versioned bucket; emptied and removed afterwards.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import boto3.session
import pytest
from moto.server import ThreadedMotoServer

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

REGION = "us-east-1"
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}


@functools.cache
def s3_client(endpoint_url: str) -> S3Client:
    """A plain boto3 client for the moto server, made once (each takes ~0.1 s to create) and
    shared: by the fixtures, by tests that inspect the bucket, and by stores under test."""
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=REGION)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 on 127.0.0.1 (a port the OS picks); yields its endpoint URL."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in FAKE_AWS_ENV.items():
            patch.setenv(name, value)
        # Keep a developer's real profile and config files out of the tests.
        nowhere = tmp_path_factory.mktemp("aws") / "absent"
        patch.setenv("AWS_CONFIG_FILE", str(nowhere))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
        patch.delenv("AWS_PROFILE", raising=False)
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        patch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint_url = f"http://{host}:{port}"
            yield endpoint_url
        finally:
            s3_client.cache_clear()
            server.stop()


@pytest.fixture
def s3_bucket(moto_server: str) -> Iterator[str]:
    """A fresh versioned bucket on the moto server; yields its name."""
    client = s3_client(moto_server)
    name = f"kshipra-test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    try:
        yield name
    finally:
        _remove_bucket(client, name)


def _remove_bucket(client: S3Client, name: str) -> None:
    """Delete every version, delete marker and open upload, then the bucket (moto keeps all of
    it in memory for the whole session otherwise)."""
    for page in client.get_paginator("list_object_versions").paginate(Bucket=name):
        doomed: list[ObjectIdentifierTypeDef] = [
            {"Key": v["Key"], "VersionId": v["VersionId"]}
            for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
        ]
        if doomed:
            client.delete_objects(Bucket=name, Delete={"Objects": doomed, "Quiet": True})
    for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
        client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
    client.delete_bucket(Bucket=name)
