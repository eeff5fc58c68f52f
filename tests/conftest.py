"""Shared pytest fixtures."""
from __future__ import annotations

import os
import uuid

import pytest
from s3proxy import S3Proxy
from s3server import SeaweedS3

from dataset import storage


@pytest.fixture(scope="session")
def s3_server():
    """A SeaweedFS S3 server on 127.0.0.1 for the whole test session."""
    server = SeaweedS3()
    try:
        server.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket `s3://...`, with the AWS environment (and storage's client) pointed at it."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    for var in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):  # ignore ~/.aws
        monkeypatch.setenv(var, os.devnull)
    for var, value in s3_server.env().items():
        monkeypatch.setenv(var, value)
    storage.reset_s3_client()
    yield f"s3://{name}"
    storage.reset_s3_client()


@pytest.fixture(scope="session")
def lax_s3():
    """A second SeaweedFS that also takes unsigned writes, behind a proxy that drops If-None-Match / If-Match:
    storage that ignores conditional writes, as some S3-compatible gateways do."""
    server = SeaweedS3(anonymous=True)
    server.start()
    with S3Proxy(server.endpoint, drop_headers=("If-None-Match", "If-Match"), anonymous=True) as proxy:
        server.client().create_bucket(Bucket="lax")
        proxy.server_env, proxy.upstream_server = server.env(), server
        yield proxy
    server.stop()


@pytest.fixture
def gateway_bucket(lax_s3, monkeypatch):
    """`s3://lax` through that proxy, with the AWS environment (and storage's client) pointed at it."""
    for var, value in lax_s3.server_env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", lax_s3.url)
    storage.reset_s3_client()
    yield "s3://lax"
    storage.reset_s3_client()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """The same test on a local folder and on a fresh S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random-weight LLaVA built locally (nothing downloaded), shared by the whole session."""
    from recaption.tiny import build_tiny_llava

    return str(build_tiny_llava(tmp_path_factory.mktemp("tiny-llava")))


@pytest.fixture(scope="session")
def vllm_engine(tiny_model):
    """One vLLM CPU engine for the session, with the default engine flags: starting one costs 30-120 s here."""
    from recaption.engines import EngineConfig, SamplingConfig, make_engine

    engine = make_engine(EngineConfig(tiny_model), SamplingConfig(max_tokens=48))
    yield engine
    engine.close()
