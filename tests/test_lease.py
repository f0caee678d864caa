"""The run-name lease (dcgan_dist/lease.py) in a folder and in a real S3 server (moto's), with a real holder
killed by SIGKILL."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import moto_server
from dcgan_dist.data import s3
from dcgan_dist.lease import RunBusy, RunLease

HOLD = """
import sys, time
from dcgan_dist.lease import RunLease
with RunLease(sys.argv[1], "bedrooms", ttl_s=float(sys.argv[2])):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_in_a_process(storage: str, ttl_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, storage, str(ttl_s)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def moto_s3():
    with moto_server("ckpt") as server:
        yield server


def test_a_folder_lease_refuses_a_second_holder_and_frees_when_its_holder_dies(tmp_path):
    with RunLease(str(tmp_path), "bedrooms"):
        with pytest.raises(RunBusy, match=r"'bedrooms' is being trained by .* pid %d" % os.getpid()):
            RunLease(str(tmp_path), "bedrooms").__enter__()
        with RunLease(str(tmp_path), "other"):  # another run name is another lease
            pass
    with RunLease(f"file://{tmp_path}", "bedrooms"):  # released at the end of the block
        pass
    proc = hold_in_a_process(str(tmp_path), 60)
    with pytest.raises(RunBusy, match=f"pid {proc.pid}"):
        RunLease(str(tmp_path), "bedrooms").__enter__()
    proc.kill()
    proc.wait()
    with RunLease(str(tmp_path), "bedrooms"):  # the kernel released the dead holder's lock
        pass


def lease_etag() -> str | None:
    import boto3

    try:
        return boto3.client("s3").head_object(Bucket="ckpt", Key="runs/bedrooms/.lease")["ETag"]
    except Exception:  # noqa: BLE001 - none yet
        return None


def wait_for(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def test_an_s3_lease_is_a_compare_and_set_renewed_by_its_holder_and_taken_over_after_it_dies(moto_s3):
    """Observed, not slept on (a loaded 2-core machine delays a renewal by seconds): the holder's renewals are seen
    as new ETags; after it dies, its lease is refused until it expires and taken as soon as it has."""
    storage = "s3://ckpt/runs"
    proc = hold_in_a_process(storage, 1.5)
    try:
        first = wait_for(lease_etag)
        wait_for(lambda: lease_etag() not in (None, first))  # renewed by its holder
        with pytest.raises(RunBusy, match=rf"pid {proc.pid} \(lease s3://ckpt/runs/bedrooms/.lease"):
            RunLease(storage, "bedrooms", ttl_s=1.5).__enter__()
    finally:
        proc.kill()
        proc.wait()
    last = lease_etag()
    with pytest.raises(RunBusy):  # dead, but its lease has not expired yet
        RunLease(storage, "bedrooms", ttl_s=1.5).__enter__()

    def taken():
        lease = RunLease(storage, "bedrooms", ttl_s=1.5)
        try:
            lease.__enter__()
        except RunBusy:
            return None
        lease.__exit__(None, None, None)
        return True

    wait_for(taken, timeout=20)  # expired: taken over by compare-and-set (and freed again)
    assert last is not None and lease_etag() is None
    with RunLease(storage, "bedrooms", ttl_s=1.5) as lease:
        assert s3.exists("s3://ckpt/runs/bedrooms/.lease")
        with pytest.raises(RunBusy):
            RunLease(storage, "bedrooms").__enter__()
        assert lease._etag
    assert s3.exists("s3://ckpt/runs/bedrooms/.lease") is None  # freed at the end, not left to expire


def test_a_storage_folder_whose_lock_another_node_does_not_see_is_refused_at_start(local_ray, tmp_path, digits_dir):
    """`file://` storage must be one folder, with working locks, on every node: the run lease and the champion lock
    are flocks. A second Ray node joins the local cluster in a mount namespace of its own, where the storage path
    is another folder (as NFS mounted `nolock` shows every node the files but keeps each node's locks to itself).
    The job is refused at start, naming that node and the lease file: once where that node finds a lease file of
    its own and could lock it, once where it finds none (the folder is not shared); no MLflow run is made. The
    same cluster without that node trains from this folder (every other local test does)."""
    import ray
    from mlflow import MlflowClient

    from conftest import tiny_overrides
    from dcgan_dist.config import load_config
    from dcgan_dist.errors import ConfigError
    from dcgan_dist.trainer import train

    storage, elsewhere = tmp_path / "storage", tmp_path / "elsewhere"
    storage.mkdir()
    (elsewhere / "nolock").mkdir(parents=True)
    (elsewhere / "nolock" / ".lease").write_text("{}")  # the same file name, another file: its lock is not ours
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    node = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount --bind {elsewhere} {storage} && exec {ray_cli} start --address={local_ray} --num-cpus=0 --block"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def alive() -> int:
        return sum(n["Alive"] for n in ray.nodes())

    try:
        deadline = time.time() + 60
        while alive() < 2:
            assert node.poll() is None and time.time() < deadline, node.stdout.read() if node.poll() else "no node"
            time.sleep(0.5)
        for run_name, answer in (("nolock", "could lock"), ("unshared", "does not have")):
            overrides = tiny_overrides(tmp_path, digits_dir, **{"train.run_name": run_name,
                                                                 "ray.storage_path": f"file://{storage}"})
            with pytest.raises(ConfigError, match=rf"ray.storage_path: node \S+ {answer} {storage}/{run_name}/"
                                                  r"\.lease, which this node holds locked: .*\(NFS without nolock\)"):
                train(load_config(overrides=overrides))
        client = MlflowClient(load_config(overrides=overrides).tracking.uri)
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
    finally:
        os.killpg(node.pid, 15)
        node.wait(60)
        deadline = time.time() + 60
        while alive() > 1 and time.time() < deadline:  # later tests must not send work to a node that is gone
            time.sleep(0.5)
    assert alive() == 1
