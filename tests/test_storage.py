"""storage.py against a local folder and a real S3 server (SeaweedFS on loopback)."""
from __future__ import annotations

import os
import tarfile
import threading
import time

import pytest
from s3proxy import S3Proxy

from dataset import storage


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


# --- conditional writes, versions, ages -----------------------------------------------------

def test_conditional_create_and_compare_and_swap(root):
    path = storage.join(root, "_claims", "00001.json")
    first = storage.create_if_absent(path, b"one")
    assert first is not None and storage.create_if_absent(path, b"two") is None
    assert storage.read_versioned(path).data == b"one"
    assert storage.put_if_match(path, b"stale", '"' + "0" * 32 + '"') is None
    second = storage.put_if_match(path, b"three", first)
    assert second is not None and second != first
    assert storage.put_if_match(path, b"late", first) is None          # the etag this writer saw is gone
    current = storage.read_versioned(path)
    assert (current.data, current.etag) == (b"three", second)
    assert storage.put_if_match(storage.join(root, "_claims", "absent.json"), b"x", second) is None
    assert storage.read_versioned(storage.join(root, "_claims", "absent.json")) is None


def test_etag_changes_on_every_write(root):
    path = storage.join(root, "state.json")
    etags = []
    for i in range(5):
        storage.write_bytes(path, f"version {i}".encode())
        etags.append(storage.read_versioned(path).etag)
    assert len(set(etags)) == 5
    if not storage.is_remote(root):  # locally even the same bytes written again get a new etag
        storage.write_bytes(path, b"version 4")
        assert storage.read_versioned(path).etag != etags[-1]


def test_compare_and_swap_has_exactly_one_winner(root):
    path = storage.join(root, "_claims", "00002.json")
    etag = storage.create_if_absent(path, b"start")
    start = threading.Barrier(8)
    won: dict[int, str | None] = {}

    def swap(i: int) -> None:
        start.wait()
        won[i] = storage.put_if_match(path, f"writer {i}".encode(), etag)

    threads = [threading.Thread(target=swap, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, new_etag in won.items() if new_etag is not None]
    assert len(winners) == 1
    current = storage.read_versioned(path)
    assert (current.data, current.etag) == (f"writer {winners[0]}".encode(), won[winners[0]])


def test_age_uses_the_storage_clock_not_the_clients(root, monkeypatch):
    path = storage.join(root, "claim.json")
    storage.write_bytes(path, b"x")
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)   # this client's clock is an hour fast
    # S3 stamps Date and Last-Modified in whole seconds, so a fresh object's age is 0 or 1 (2 on a slow box).
    assert 0 <= storage.read_versioned(path).age <= 2
    if not storage.is_remote(root):  # a file last written 100 s ago by the file system's clock
        os.utime(path, (os.stat(path).st_atime, os.stat(path).st_mtime - 100))
        assert 99 <= storage.read_versioned(path).age <= 102


def test_durable_create_is_visible_whole_or_not_at_all(root):
    data = os.urandom(1 << 20 if storage.is_remote(root) else 4 << 20)
    paths = [storage.join(root, "_ledger", f"{i:05d}.json") for i in range(4 if storage.is_remote(root) else 16)]
    creating = [0]   # the index of the path being created
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:  # reads the path being created as fast as it can
        while not done.is_set():
            try:
                seen.append(len(storage.read_bytes(paths[creating[0]])))
            except FileNotFoundError:
                pass

    reader = threading.Thread(target=watch)
    reader.start()
    for i, path in enumerate(paths):
        creating[0] = i
        assert storage.put_if_absent(path, data)
    done.set()
    reader.join()
    assert seen and set(seen) == {len(data)}
    if not storage.is_remote(root):
        assert not [p for p in os.listdir(storage.parent(paths[0])) if p.endswith(".tmp")]


def test_expand_inputs_lists_each_folder_once(root):
    _make_shards(root, 12)
    data = storage.join(root, "data")
    storage.REQUESTS.clear()
    assert len(storage.expand_inputs(data + "/{00000..00011}.tar")) == 12
    assert len(storage.expand_inputs(data + "/{00000..00005}.tar") + storage.expand_inputs(data)) == 18
    assert storage.REQUESTS == {"list": 3}    # one listing per call, however many names; no per-shard stat


# --- a store that breaks: reads cut off mid-stream, gateways that ignore conditions ---------

@pytest.fixture
def via_proxy(s3_bucket, s3_server, monkeypatch):
    """The test bucket reached through a loopback proxy that can cut responses short."""
    with S3Proxy(s3_server.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setattr(storage, "RESUME_BACKOFF_S", 0.01)
        storage.reset_s3_client()
        yield s3_bucket, proxy
        storage.reset_s3_client()


def test_read_cut_off_mid_stream_resumes_or_raises(via_proxy):
    bucket, proxy = via_proxy
    data = os.urandom(3 << 20)
    path = f"{bucket}/shards/00000.tar"
    storage.write_bytes(path, data)

    proxy.cut_next_reads(2, after_bytes=100_000)             # a flaky connection: resumed where it broke
    assert storage.read_bytes(path) == data
    proxy.cut_next_reads(1, after_bytes=100_000)
    with storage.open_read(path) as stream:
        assert stream.read() == data

    proxy.cut_next_reads(100, after_bytes=0)                 # a dead one: an error naming the file, never short
    with pytest.raises(OSError, match=f"read {path} failed at byte .* after {storage.READ_RESUMES} resumes"):
        storage.read_bytes(path)
    with pytest.raises(OSError, match="00000.tar"), storage.open_read(path) as stream:
        while stream.read(512):
            pass

    proxy.cut_next_reads(1, after_bytes=100_000)             # the object changes while it is being read
    stream = storage.open_read(path)
    storage.write_bytes(path, os.urandom(3 << 20))
    with pytest.raises(OSError, match="changed or went away while being read"):
        stream.read()
    stream.close()


def test_transient_errors_are_retried_and_a_lost_answer_is_recognised(via_proxy, monkeypatch):
    bucket, proxy = via_proxy
    path, lost = f"{bucket}/_ledger/00000.json", f"{bucket}/_ledger/00001.json"
    proxy.fail_next(1)                                  # 503 before the server saw the request: retried
    assert storage.put_if_absent(path, b"mine")
    proxy.fail_next(1, after_forwarding=True)           # created, then the answer was lost: the retry is
    assert storage.put_if_absent(lost, b"mine too")     # refused (412), the stored bytes show it was ours
    proxy.fail_next(1, after_forwarding=True)
    assert not storage.put_if_absent(lost, b"someone else's")
    assert storage.list_files(f"{bucket}/_ledger") == [path, lost]

    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)  # a store that keeps failing: errors, never "absent"
    storage.reset_s3_client()
    proxy.fail_next(1000)
    for call in (storage.read_versioned, storage.exists):
        with pytest.raises(OSError, match=path):
            call(path)
    with pytest.raises(OSError, match=f"list {bucket}/_ledger failed: SlowDown"):
        storage.list_files(f"{bucket}/_ledger")


def test_probe_refuses_storage_that_ignores_conditions(lax_s3, s3_bucket, monkeypatch, tmp_path):
    assert storage.probe_conditional_writes(str(tmp_path / "out")) is None
    assert storage.probe_conditional_writes(f"{s3_bucket}/out") is None

    monkeypatch.setenv("AWS_ENDPOINT_URL", lax_s3.url)
    storage.reset_s3_client()
    path = "s3://lax/out/_ledger/00000.json"
    assert storage.put_if_absent(path, b"first") and storage.put_if_absent(path, b"second")  # last writer wins
    reason = storage.probe_conditional_writes("s3://lax/out")
    assert reason and "ignores If-None-Match" in reason and lax_s3.url in reason
    assert storage.list_files("s3://lax/out/_probe") == []   # the probe cleans up after itself


def test_probe_refuses_a_store_whose_conditional_creates_race(lax_s3, monkeypatch):
    """Issue 19, case 10: right for one writer at a time, so only a concurrent burst shows it."""
    with S3Proxy(lax_s3.upstream_server.endpoint, anonymous=True, racy_creates=True) as racy:
        for var, value in lax_s3.server_env.items():
            monkeypatch.setenv(var, value)
        monkeypatch.setenv("AWS_ENDPOINT_URL", racy.url)
        storage.reset_s3_client()
        path = "s3://lax/racy/_ledger/00000.json"
        assert storage.put_if_absent(path, b"first") and not storage.put_if_absent(path, b"second")
        reason = storage.probe_conditional_writes("s3://lax/racy")
        assert reason and "concurrent conditional creates" in reason and "win (exactly one must)" in reason
        assert racy.url in reason
    storage.reset_s3_client()


def test_probe_turns_a_store_that_rejects_conditional_headers_into_one_line(lax_s3, monkeypatch):
    with S3Proxy(lax_s3.upstream_server.endpoint, anonymous=True, refuse_conditions=True) as refusing:
        for var, value in lax_s3.server_env.items():
            monkeypatch.setenv(var, value)
        monkeypatch.setenv("AWS_ENDPOINT_URL", refusing.url)
        monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)
        storage.reset_s3_client()
        reason = storage.probe_conditional_writes("s3://lax/refusing")
        assert reason and reason.startswith(f"S3 endpoint {refusing.url} failed a conditional-write check: OSError")
        assert "NotImplemented" in reason and "\n" not in reason
    storage.reset_s3_client()
