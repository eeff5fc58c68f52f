"""storage.py against a local folder and a real S3 server (SeaweedFS on loopback)."""
from __future__ import annotations

import os
import tarfile
import threading
import time

import pytest

from dataset import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """The same tests on a local folder and on a fresh S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


def test_round_trip(root):
    path = storage.join(root, "a", "b.json")
    assert not storage.exists(path)
    storage.write_bytes(path, b"hello")
    assert storage.exists(path)
    assert storage.read_bytes(path) == b"hello"
    assert storage.size(path) == 5
    assert abs(storage.mtime(path) - time.time()) < 60
    with storage.open_read(path) as stream:
        assert stream.read() == b"hello"
    storage.write_bytes(path, b"replaced")
    assert storage.read_bytes(path) == b"replaced"
    storage.delete(path)
    storage.delete(path)  # already gone: no error
    assert not storage.exists(path)


def test_missing_file_error_names_the_path(root):
    path = storage.join(root, "nothing-here.tar")
    with pytest.raises(FileNotFoundError, match="nothing-here.tar"):
        storage.read_bytes(path)
    with pytest.raises(FileNotFoundError, match="nothing-here.tar"):
        storage.size(path)


def test_put_file_consumes_the_local_file(root, tmp_path):
    data = os.urandom(9 * 2**20)  # above boto3's 8 MiB multipart threshold
    local = tmp_path / "finished.tar"
    local.write_bytes(data)
    path = storage.join(root, "wds", "00000.tar")
    storage.put_file(str(local), path)
    assert not local.exists()
    assert storage.read_bytes(path) == data


def test_open_read_streams_a_tar(root, tmp_path):
    member = tmp_path / "0.txt"
    member.write_text("a caption")
    local_tar = tmp_path / "shard.tar"
    with tarfile.open(local_tar, "w") as tar:
        tar.add(member, arcname="0.txt")
    path = storage.join(root, "shard.tar")
    storage.put_file(str(local_tar), path)
    with storage.open_read(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        names = [(m.name, tar.extractfile(m).read()) for m in tar]
    assert names == [("0.txt", b"a caption")]


def test_open_read_in_small_pieces(root):
    data = os.urandom(3 * 2**20 + 123)
    path = storage.join(root, "big.bin")
    storage.write_bytes(path, data)
    pieces = []
    with storage.open_read(path) as stream:
        while piece := stream.read(100_000):
            pieces.append(piece)
    assert b"".join(pieces) == data


def test_local_writes_leave_no_temporary_files(tmp_path):
    target = tmp_path / "out" / "ledger.json"
    storage.write_bytes(str(target), b"{}")
    source = tmp_path / "part.parquet"
    source.write_bytes(b"rows")
    storage.put_file(str(source), str(tmp_path / "out" / "part.parquet"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ledger.json", "part.parquet"]


def test_failed_local_write_leaves_no_target(tmp_path):
    target = tmp_path / "ledger.json"
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), "not bytes")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    storage.write_bytes(str(target), b"old")
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_put_if_absent_has_exactly_one_winner(root):
    path = storage.join(root, "_claims", "00007.json")
    start = threading.Barrier(16)
    results: dict[int, bool] = {}

    def claim(i: int) -> None:
        start.wait()
        results[i] = storage.put_if_absent(path, f"driver {i}".encode())

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(results) == 16 and len(winners) == 1
    assert storage.read_bytes(path) == f"driver {winners[0]}".encode()
    assert storage.put_if_absent(path, b"late") is False


def test_list_files_direct_children_sorted_and_paginated(root, monkeypatch):
    monkeypatch.setattr(storage, "LIST_PAGE_SIZE", 7)
    folder = storage.join(root, "shards")
    names = [f"{i:05d}.tar" for i in range(25)]
    for name in reversed(names):
        storage.write_bytes(storage.join(folder, name), b"x")
    storage.write_bytes(storage.join(folder, "00000.parquet"), b"x")
    storage.write_bytes(storage.join(folder, "nested", "00099.tar"), b"x")
    assert storage.list_files(folder, ".tar") == [storage.join(folder, n) for n in names]
    assert len(storage.list_files(folder)) == 26
    assert storage.list_files(storage.join(root, "no-such-folder")) == []


def test_expand_braces():
    assert storage.expand_braces("d/{8..11}.tar") == ["d/8.tar", "d/9.tar", "d/10.tar", "d/11.tar"]
    assert storage.expand_braces("{0..1}-{008..009}") == ["0-008", "0-009", "1-008", "1-009"]
    assert storage.expand_braces("plain.tar") == ["plain.tar"]


def _make_shards(root: str, count: int) -> list[str]:
    paths = [storage.join(root, "data", f"{i:05d}.tar") for i in range(count)]
    for path in paths:
        storage.write_bytes(path, b"tar")
    storage.write_bytes(storage.join(root, "data", "00000.parquet"), b"meta")
    return paths


def test_expand_inputs(root):
    shards = _make_shards(root, 12)
    data = storage.join(root, "data")
    assert storage.expand_inputs(data) == shards
    assert storage.expand_inputs(data + "/") == shards
    assert storage.expand_inputs(data + "/*.tar") == shards
    assert storage.expand_inputs(data + "/0000[0-2].tar") == shards[:3]
    assert storage.expand_inputs(data + "/{00003..00005}.tar") == shards[3:6]
    assert storage.expand_inputs(data + "/{00010..00099}.tar") == shards[10:]  # existing only
    assert storage.expand_inputs(shards[4]) == [shards[4]]
    with pytest.raises(ValueError, match="no input shards match .*nothing"):
        storage.expand_inputs(storage.join(root, "nothing"))
    with pytest.raises(ValueError, match="no input shards match"):
        storage.expand_inputs(data + "/{00100..00199}.tar")


def test_unsupported_scheme_is_rejected():
    with pytest.raises(ValueError, match="gs://bucket/x.tar.*unsupported scheme"):
        storage.read_bytes("gs://bucket/x.tar")


def test_client_follows_aws_endpoint_url(s3_bucket, s3_server):
    assert storage.s3_client().meta.endpoint_url == s3_server.endpoint


def test_wrong_secret_is_rejected_clearly(s3_bucket, monkeypatch):
    path = f"{s3_bucket}/secret.txt"
    storage.write_bytes(path, b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage.reset_s3_client()
    expected = "read s3://.*/secret.txt failed: SignatureDoesNotMatch"
    with pytest.raises(PermissionError, match=expected) as e:
        storage.read_bytes(path)
    assert "not-the-secret" not in str(e.value)
    with pytest.raises(PermissionError, match="write s3://.*/new.txt failed"):
        storage.write_bytes(f"{s3_bucket}/new.txt", b"x")


def test_missing_bucket_names_the_path(s3_bucket):
    expected = "list s3://no-such-bucket-here/x failed: NoSuchBucket"
    with pytest.raises(FileNotFoundError, match=expected):
        storage.list_files("s3://no-such-bucket-here/x")
