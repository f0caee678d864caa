"""The data plane against a real S3-compatible HTTP server (moto's standalone server on loopback)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time

import boto3
import numpy as np
import pytest

from conftest import EXIT_DATA, REPO, free_port, moto_server
from dcgan_dist.data import s3, shards, sources
from synthetic import lsun_key, write_lsun_lmdb
from dcgan_dist.data.loader import make_batches, resolve_shards
from dcgan_dist.errors import DataError
from servers import MotoServer, client_env


@pytest.fixture(scope="module")
def moto():
    with moto_server("data") as server:
        yield server


def make_lmdb(path, n, corrupt=()):
    return write_lsun_lmdb(path, n, corrupt=set(corrupt))


def make_cifar(path, per_batch=12):
    path.mkdir()
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(x) for x in rng.integers(0, 10, per_batch)], b"batch_label": name.encode()}
        with open(path / name, "wb") as f:
            pickle.dump(batch, f)


def s3_manifest(prefix):
    return json.loads(s3.read_bytes(prefix + "manifest.json"))


def test_digits_to_s3_manifest_is_exact(moto):
    m = shards.build_shards(sources.Digits(), "s3://data/digits/", resolution=32, encoding="png",
                            shard_size=700, workers=2, progress=False)
    assert m == s3_manifest("s3://data/digits/")
    assert [s["count"] for s in m["shards"]] == [700, 700, 397] and m["num_images"] == 1797
    for s in m["shards"]:
        data = s3.read_bytes(f"s3://data/digits/{s['name']}")
        assert len(data) == s["bytes"] and __import__("hashlib").sha256(data).hexdigest() == s["sha256"]
    keys = s3.list_keys("s3://data/digits/")
    assert "digits/manifest.json" in keys and "digits/parts/shard-000002.tar.json" in keys
    batch = next(make_batches(resolve_shards("s3://data/digits/"), channels=1, resolution=32, batch_size=8,
                              seed=0, shuffle_buffer=10))
    assert batch.shape == (8, 1, 32, 32)


def test_lsun_lmdb_to_s3_with_a_corrupt_value(moto, tmp_path):
    keys = make_lmdb(tmp_path / "bedroom_train_lmdb", 60, corrupt={5})
    bad = lsun_key(5)
    m = shards.build_shards(sources.Lsun(tmp_path / "bedroom_train_lmdb"), "s3://data/lsun/", resolution=32,
                            shard_size=25, workers=2, progress=False)
    assert (m["num_images"], m["num_shards"], m["channels"], m["source"]) == (59, 3, 3, "lsun")
    assert m["skipped"] == {"count": 1, "ids": [bad]}
    assert [s["count"] for s in m["shards"]] == [24, 25, 10]
    assert bad in keys
    it = make_batches(resolve_shards("s3://data/lsun/"), channels=3, resolution=32, batch_size=16, seed=0,
                      shuffle_buffer=20)
    assert next(it).shape == (16, 3, 32, 32)


@pytest.mark.parametrize("encoding", ["jpg", "raw"])
def test_cifar10_batches_keep_labels(moto, tmp_path, encoding):
    make_cifar(tmp_path / "cifar-10-batches-py")
    src = sources.Cifar10(tmp_path / "cifar-10-batches-py", "train")
    out = f"s3://data/cifar-{encoding}/"
    m = shards.build_shards(src, out, resolution=32, encoding=encoding, shard_size=20, workers=2, progress=False)
    assert m["num_images"] == 60 and m["encoding"] == encoding
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="bytes")
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(s3.read_bytes(out + "shard-000000.tar"))) as tar:
        assert tar.extractfile("000000000.cls").read() == str(first[b"labels"][0]).encode()
        assert tar.extractfile("000000000.id.txt").read() == b"data_batch_1/00000"
        if encoding == "raw":
            arr = np.load(io.BytesIO(tar.extractfile("000000000.npy").read()))
            assert np.array_equal(arr, first[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    batch = next(make_batches(resolve_shards(out), channels=3, resolution=32, batch_size=10, seed=0, shuffle_buffer=5))
    assert batch.shape == (10, 3, 32, 32)


def build_cmd(src, out, *extra):
    return [sys.executable, "jobs/prepare_data.py", "lsun", str(src), "--out", out, "--resolution", "32",
            "--shard-size", "20", "--workers", "1", *extra]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_killed_build_resumes_to_the_same_manifest(moto, tmp_path, where):
    make_lmdb(tmp_path / "db", 400)
    base = str(tmp_path) + "/" if where == "local" else "s3://data/resume-"
    whole, partial = base + "whole/", base + "partial/"
    assert subprocess.run(build_cmd(tmp_path / "db", whole), cwd=REPO, capture_output=True).returncode == 0

    proc = subprocess.Popen(build_cmd(tmp_path / "db", partial), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = shards.Target(partial)
    deadline = time.time() + 120
    while time.time() < deadline and target.read_json("parts/shard-000003.tar.json") is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # like a crash (or Ctrl-C) of the whole build
    proc.wait()
    assert target.read_json("manifest.json") is None, "the build finished before it could be interrupted"
    assert target.read_json("parts/shard-000019.tar.json") is None

    r = subprocess.run(build_cmd(tmp_path / "db", partial), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert target.read_json("manifest.json") == shards.Target(whole).read_json("manifest.json")
    if where == "local":
        assert not list((tmp_path / "partial").glob(".*.tmp"))


def test_every_shard_is_read_by_some_rank(digits_dir):
    shard_set = resolve_shards(str(digits_dir))
    seen = set()
    for rank in (0, 1):
        it = make_batches(shard_set, channels=1, resolution=32, batch_size=50, seed=3, rank=rank, shuffle_buffer=50)
        for _ in range(40):
            next(it)
        seen |= set(it.loader.dataset.shards_read)
    assert seen == set(shard_set.urls)


def run_prepare(env_update, out="s3://data/errors/"):
    env = {**os.environ, **env_update}
    r = subprocess.run([sys.executable, "jobs/prepare_data.py", "digits", "--out", out], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == EXIT_DATA and "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.stderr


def test_clear_s3_errors(moto, tmp_path):
    assert "bucket 'nope' does not exist" in run_prepare({}, "s3://nope/x/")
    msg = run_prepare({"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}"})
    assert "cannot reach the S3 endpoint" in msg and "s3://data/errors/" in msg
    # No keys in the environment, no profile files, no instance metadata: the whole chain comes up empty.
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE")}
    env.update({"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "x"), "AWS_CONFIG_FILE": str(tmp_path / "y")})
    r = subprocess.run([sys.executable, "jobs/prepare_data.py", "digits", "--out", "s3://data/x/"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == EXIT_DATA and "no AWS credentials" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(DataError, match="bucket 'missing' does not exist"):
        resolve_shards("s3://missing/shards/")
    with pytest.raises(DataError, match="no manifest.json and no"):
        resolve_shards("s3://data/empty-prefix/")


def test_shards_missing_from_an_s3_prefix_are_named_before_training(moto):
    """Most shards of a manifest gone from the bucket: refused at start, naming them (the reader would otherwise
    train on the few left, each missing shard one skip among many good samples)."""
    url = "s3://data/gappy/"
    built = shards.build_shards(sources.Digits(), url, resolution=32, encoding="png", shard_size=300, workers=2,
                                progress=False)
    names = [s["name"] for s in built["shards"]]
    for name in names[1:5]:
        boto3.client("s3").delete_object(Bucket="data", Key=f"gappy/{name}")
    with pytest.raises(DataError, match=rf"manifest.json lists 4 shard\(s\) missing from s3://data/gappy/: "
                                        rf"{names[1]}, {names[2]}, {names[3]}, {names[4]}$"):
        resolve_shards(url)


def test_wrong_credentials_are_named(tmp_path):
    server = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # moto checks keys against its IAM
    try:
        env = {**os.environ, **client_env(server.url)}
        r = subprocess.run([sys.executable, "jobs/prepare_data.py", "digits", "--out", "s3://data/x/"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == EXIT_DATA and "Traceback" not in r.stderr
        assert "rejected the credentials" in r.stderr and "s3://data/x/" in r.stderr
    finally:
        server.stop()


@contextlib.contextmanager
def through(proxy, moto):
    """This process's S3 requests go through `proxy` for the block, then straight to `moto` again."""
    os.environ["AWS_ENDPOINT_URL_S3"] = proxy.url
    s3._clients.clear()
    try:
        yield proxy
    finally:
        os.environ["AWS_ENDPOINT_URL_S3"] = moto.url
        s3._clients.clear()
        proxy.close()


class CuttingProxy:
    """A loopback TCP proxy to the S3 server that cuts the first response after `cut_after` bytes."""

    def __init__(self, target_port: int, cut_after: int):
        import socket
        import threading

        self.target_port, self.cut_after, self.cuts_left = target_port, cut_after, 1
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        import socket
        import threading

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self._answer_itself(client):
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _answer_itself(self, client) -> bool:
        """A subclass's chance to answer a connection without the server; True when it did."""
        return False

    def _pump(self, src, dst, is_response):
        sent = 0
        try:
            while data := src.recv(65536):
                if is_response and self.cuts_left and sent + len(data) > self.cut_after:
                    self.cuts_left -= 1
                    dst.sendall(data[: self.cut_after - sent])
                    break  # drop the connection mid-body
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(2)  # SHUT_RDWR: wakes the pump blocked on the other direction
            except OSError:
                pass
            s.close()

    def close(self):
        self.sock.close()


def test_a_connection_cut_mid_body_resumes_with_a_range_request(moto):
    payload = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    boto3.client("s3").put_object(Bucket="data", Key="big.bin", Body=payload)
    with through(CuttingProxy(moto.port, cut_after=1 << 20), moto) as proxy:
        before = s3.retries()
        body = s3.ResumableBody("s3://data/big.bin", backoff=0.05)
        assert body.read() == payload  # every byte, in order, across the cut
        assert s3.retries() > before and proxy.cuts_left == 0


def test_inception_weights_load_from_s3_with_their_checksum_and_real_stats_come_from_s3_shards(moto, tmp_path):
    import hashlib
    import io

    import torch

    from dcgan_dist.config import MetricsConfig
    from dcgan_dist.errors import ConfigError
    from dcgan_dist.metrics.inception import load_inception, random_inception_state
    from dcgan_dist.metrics.evaluator import Evaluator

    buf = io.BytesIO()
    torch.save(random_inception_state(), buf)
    s3.write_bytes("s3://data/weights/inception.pth", buf.getvalue())
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    extractor = load_inception("s3://data/weights/inception.pth", digest)
    assert extractor.sha256 == digest and extractor.dim == 2048
    with pytest.raises(ConfigError, match="s3://data/weights/missing.pth"):
        load_inception("s3://data/weights/missing.pth", digest)

    shards.build_shards(sources.Digits(), "s3://data/digits-eval/", resolution=32, encoding="png", shard_size=400,
                        workers=1, progress=False)
    ev = Evaluator(MetricsConfig(num_images=64, cache_dir=str(tmp_path)), resolve_shards("s3://data/digits-eval/"),
                   channels=1, resolution=32)
    assert ev.real_images.shape == (64, 1, 32, 32) and ev.names == ("swd",)
    assert len({int(x) for x in ev.real_images.float().mean((1, 2, 3)).round()}) > 10  # many different images


def test_an_object_replaced_between_two_range_reads_is_refused_not_spliced(moto):
    """The read is cut at 1 MB (a real dropped connection); meanwhile the object was replaced: the resumed
    Range request carries If-Match, S3 answers 412, and the reader gets a DataError instead of a splice."""
    rng = np.random.default_rng(0)
    old, new = (rng.integers(0, 256, 3 << 20, dtype=np.uint8).tobytes() for _ in range(2))
    boto3.client("s3").put_object(Bucket="data", Key="shard.tar", Body=old)
    with through(CuttingProxy(moto.port, cut_after=1 << 20), moto) as proxy:
        body = s3.ResumableBody("s3://data/shard.tar", backoff=0.05)
        assert body.read(256 << 10) == old[: 256 << 10]
        boto3.client("s3", endpoint_url=moto.url).put_object(Bucket="data", Key="shard.tar", Body=new)
        with pytest.raises(DataError, match=r"s3://data/shard.tar was replaced while being read \(at byte \d+"):
            body.read()
        assert proxy.cuts_left == 0


class SlowDownProxy(CuttingProxy):
    """A loopback proxy to the S3 server that answers its first `refusals` connections with 503 SlowDown, as S3
    does to a prefix read too fast; later connections pass through."""

    BODY = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"

    def __init__(self, target_port: int, refusals: int):
        self.refusals = refusals
        super().__init__(target_port, cut_after=0)
        self.cuts_left = 0

    def _answer_itself(self, client) -> bool:
        if self.refusals <= 0:
            return False
        self.refusals -= 1
        client.recv(65536)  # the request's headers
        client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(self.BODY), self.BODY))
        client.close()
        return True


def test_throttling_beyond_botocores_retries_backs_off_instead_of_skipping(moto, monkeypatch):
    """Three 503 SlowDown answers: botocore gives up after its attempts (two here: its own backoff between them
    is real time); the reader waits and tries again."""
    payload = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    boto3.client("s3").put_object(Bucket="data", Key="hot.tar", Body=payload)
    monkeypatch.setattr(s3, "MAX_ATTEMPTS", 2)
    s3._clients.clear()
    try:
        with through(SlowDownProxy(moto.port, refusals=3), moto) as proxy:
            before = s3.retries()
            assert s3.ResumableBody("s3://data/hot.tar", backoff=0.05).read() == payload
            assert proxy.refusals == 0 and s3.retries() > before
    finally:
        s3._clients.clear()


@pytest.mark.parametrize("reader", ["plain", "streams"])
def test_an_s3_that_is_down_for_good_stops_the_stream_within_max_stall_s(moto, monkeypatch, reader):
    """The endpoint stops answering (nothing listens there any more): every shard fails; the stream ends with an
    error naming the stall and the shards, instead of retrying forever; the same for both readers (the plain one,
    and data.streams' ordered one). Retries are cut short here (one try each) so that the test waits on the stall
    limit, not on the backoff."""
    from dcgan_dist.config import DataConfig
    from dcgan_dist.data.loader import ShardSet
    from dcgan_dist.data.streams import StreamBatches

    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        info = tarfile.TarInfo("0.png")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    for i in range(3):
        boto3.client("s3").put_object(Bucket="data", Key=f"gone/shard-{i:06d}.tar", Body=tar.getvalue())
    urls = resolve_shards("s3://data/gone/").urls
    manifest = {"channels": 1, "resolution": 32, "shards": [{"name": u.rsplit("/", 1)[1], "count": 1} for u in urls]}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(s3, "MAX_ATTEMPTS", 1)
    monkeypatch.setattr(s3, "RETRIES", 1)
    monkeypatch.setattr(s3, "BACKOFF_S", 0.01)
    s3._clients.clear()
    try:
        t0 = time.time()
        with pytest.raises(DataError, match=r"no usable image for \d+ s \(data.max_stall_s=1\); the last shards: "
                                            r"s3://data/gone/shard-00000\d.tar \(shard .* unreadable"):
            limits = DataConfig(max_bad_shards=10**6, max_stall_s=1, streams=2)
            if reader == "plain":
                next(make_batches(ShardSet(urls, None), channels=1, resolution=32, batch_size=4, seed=0,
                                  limits=limits))
            else:
                next(StreamBatches(ShardSet(urls, manifest), channels=1, resolution=32, global_batch=4, seed=0,
                                   rank=0, world=1, start_step=1, positions=None, limits=limits))
        assert time.time() - t0 < 30
    finally:
        s3._clients.clear()
