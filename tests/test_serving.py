"""Using the champion: `jobs/sample.py` and a real `mlflow models serve` process answering plain HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

from conftest import EXIT_TRACKING, free_port, run_job


def test_sample_job_writes_a_grid_and_arrays_reproducibly(digits_model, tmp_path):
    tracking_uri, model_uri = digits_model
    tracking = f"tracking.uri={tracking_uri}"
    first = run_job("sample.py", "--model", model_uri, "-n", "10", "--seed", "3", "--out", str(tmp_path / "a.png"),
                    "--npz", str(tmp_path / "a.npz"), "--set", tracking)
    assert first.returncode == 0, first.stderr
    assert Image.open(tmp_path / "a.png").size == (8 * 34 + 2, 2 * 34 + 2)  # 10 tiles of 32 px, 8 per row
    images = np.load(tmp_path / "a.npz")["images"]
    assert images.shape == (10, 1, 32, 32) and images.dtype == np.float32
    assert -1 <= images.min() < images.max() <= 1
    again = run_job("sample.py", "--model", model_uri, "-n", "10", "--seed", "3", "--npz", str(tmp_path / "b.npz"),
                    "--set", tracking)
    assert again.returncode == 0 and not (tmp_path / "samples.png").exists()  # --npz alone writes no grid
    np.testing.assert_array_equal(np.load(tmp_path / "b.npz")["images"], images)  # same seed, same images
    other = run_job("sample.py", "--model", model_uri, "-n", "10", "--seed", "4", "--npz", str(tmp_path / "c.npz"),
                    "--set", tracking)
    assert other.returncode == 0 and not np.allclose(np.load(tmp_path / "c.npz")["images"], images)

    walk = run_job("sample.py", "--model", model_uri, "-n", "2", "--interpolate", "6", "--out", str(tmp_path / "walk.png"),
                   "--npz", str(tmp_path / "walk.npz"), "--set", tracking)
    assert walk.returncode == 0, walk.stderr
    assert Image.open(tmp_path / "walk.png").size == (6 * 34 + 2, 2 * 34 + 2)
    steps = np.load(tmp_path / "walk.npz")["images"].reshape(2, 6, -1)
    # A walk: neighbouring images differ less than the two ends do.
    assert np.abs(np.diff(steps, axis=1)).mean() < np.abs(steps[:, -1] - steps[:, 0]).mean()

    name = model_uri.split("/")[1]
    for bad, named in ((f"models:/{name}/99", f"models:/{name}/99"), (f"models:/{name}@nobody", "@nobody"),
                       ("models:/nosuchmodel@champion", "nosuchmodel")):
        result = run_job("sample.py", "--model", bad, "--out", str(tmp_path / "x.png"), "--set", tracking)
        assert result.returncode == EXIT_TRACKING and named in result.stderr and "Traceback" not in result.stderr


def post(url: str, body: dict | str) -> tuple[int, dict]:
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_mlflow_models_serve_answers_latent_vectors_and_refuses_bad_ones(digits_model, tmp_path):
    tracking_uri, model_uri = digits_model
    port = free_port()
    venv_bin = os.path.dirname(sys.executable)  # as in an activated venv: the server execs `uvicorn` from PATH
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{venv_bin}:{os.environ['PATH']}"},
        cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 90 s"
            time.sleep(0.5)

        z = np.random.default_rng(0).standard_normal((3, 100))  # float64, as JSON numbers are
        code, answer = post(f"{url}/invocations", {"inputs": z.tolist()})
        assert code == 200, answer
        images = np.asarray(answer["predictions"])
        assert images.shape == (3, 1, 32, 32) and -1 <= images.min() < images.max() <= 1
        code, one = post(f"{url}/invocations", {"inputs": z[:1].tolist()})
        assert code == 200 and np.allclose(np.asarray(one["predictions"])[0], images[0], atol=1e-4)
        code, rows = post(f"{url}/invocations", {"dataframe_split": {"columns": list(range(100)), "data": z.tolist()}})
        assert code == 200 and np.allclose(np.asarray(rows["predictions"]), images, atol=1e-4)

        code, answer = post(f"{url}/invocations", {"inputs": z[:, :50].tolist()})
        assert code == 400 and "(-1, 100)" in answer["message"], answer
        code, answer = post(f"{url}/invocations", json.dumps({"inputs": z.tolist()}).replace(str(z[1][7]), "NaN"))
        assert code == 400 and "must be finite" in answer["message"] and "[1]" in answer["message"], answer
        code, answer = post(f"{url}/invocations", "{not json")
        assert code == 400, answer
    finally:
        server.terminate()
        server.wait(timeout=30)
