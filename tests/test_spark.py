"""The Spark engine (jobs.spark_engine): the first engine's rules on a real Spark, local and a standalone cluster.

The rules are compared with the first engine on the same events (validation,
confidences, viewers, watched-next); whole jobs run as cron would run them,
publish to a real redis-server, and the service serves what they published.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from models.data import DataError, load_catalog, load_events
from models.embeddings import ModelParams, confidence_matrix, learn_embeddings
from models.store import ModelStore
from tests.conftest import free_port, write_csv
from tests.helpers import nightly_command

pyspark = pytest.importorskip("pyspark")
if shutil.which("java") is None:
    pytest.skip("Java is needed for Spark (openjdk-17-jre-headless)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]


def spark_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), TEXT_EMBEDDINGS="0", SPARK_LOCAL_IP="127.0.0.1")
    env.setdefault("SPARK_MASTER", "local[2]")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ["SPARK_MASTER"] = "local[2]"
    os.environ["SPARK_LOG"] = str(tmp_path_factory.mktemp("spark-log") / "spark.log")
    from jobs.spark_engine import spark_session

    with spark_session("recs-tests") as session:
        yield session


def test_spark_validates_with_the_loaders_rules(spark, tiny_catalog, tmp_path):
    from jobs.spark_engine import read_events

    catalog, _ = load_catalog(tiny_catalog)
    rows = ["user_id,item_id,timestamp,watch_seconds"]
    rows += [f"u{n % 7},{'abc'[n % 3]},{1_600_000_000 + n * 60},{n % 50 * 60}" for n in range(300)]
    rows += [",a,1600000000,10", "u1,zz,1600000000,5", "u2,b,yesterday,10", "u3,c,1600000000,-4", "u4,a,4000000000,1"]
    events_path = write_csv(tmp_path / "events.csv", "\n".join(rows) + "\n")

    expected, expected_report = load_events(events_path, catalog, max_rejected_share=0.5)
    frame, users, report = read_events(spark, str(events_path), catalog, 0.5)
    assert report.rows_read == expected_report.rows_read == 305
    assert report.rows_rejected == expected_report.rows_rejected and report.rejected_total == 4
    assert report.unknown_items == expected_report.unknown_items == 1
    assert [r.user_id for r in users.orderBy("user").collect()] == list(expected.user_ids)
    got = frame.orderBy("user", "timestamp", "item").toPandas()
    assert got["user"].tolist() == expected.user.tolist()
    assert got["item"].tolist() == expected.item.tolist()
    assert got["timestamp"].tolist() == expected.timestamp.tolist()
    np.testing.assert_allclose(got["watch_seconds"].to_numpy(), expected.watch_seconds)

    # Over the allowed share: the loader's error, naming the file and the column, nothing read further.
    with pytest.raises(DataError) as strict:
        read_events(spark, str(events_path), catalog, 0.001)
    message = str(strict.value)
    assert "4 of 305 rows" in message and f"{events_path}: column 'timestamp'" in message
    assert "rows not numbered: read by Spark" in message
    with pytest.raises(DataError, match="missing required column"):
        read_events(spark, str(write_csv(tmp_path / "bad.csv", "user,item_id,timestamp\nu,a,1\n")), catalog, 0.5)
    with pytest.raises(DataError, match="no such file"):
        read_events(spark, str(tmp_path / "absent.csv"), catalog, 0.5)


def test_spark_fit_follows_the_first_engines_rules(spark, demo_files):
    """Confidences, viewers and watched-next neighbours equal the first engine's on the same events."""
    from jobs.spark_engine import fit, read_events
    from models.embeddings import content_vectors, viewer_rates

    catalog, _ = load_catalog(demo_files["catalog"])
    events, _ = load_events(demo_files["events"], catalog)
    # No pruning ties to break; the ALS-loss content model, so both engines draw their viewer samples.
    params = ModelParams(iterations=3, content_steps=20, seq_neighbors=10_000, content_objective="als")
    frame, _, _ = read_events(spark, str(demo_files["events"]), catalog, 0.01)
    model = fit(spark, frame, catalog, params)
    reference = learn_embeddings(events, catalog, params, show_progress=False)

    np.testing.assert_array_equal(model.viewers, reference.viewers)
    expected = confidence_matrix(events, catalog, params).tocoo()
    got = model.confidence.orderBy("user", "item").toPandas()
    order = np.lexsort((expected.col, expected.row))
    assert got["user"].tolist() == expected.row[order].tolist() and got["item"].tolist() == expected.col[order].tolist()
    np.testing.assert_allclose(got["confidence"].to_numpy(), expected.data[order], rtol=1e-4)
    assert model.sequence.nnz == reference.sequence.nnz > 0
    np.testing.assert_array_equal(model.sequence.indptr, reference.sequence.indptr)
    np.testing.assert_array_equal(model.sequence.indices, reference.sequence.indices)
    np.testing.assert_allclose(model.sequence.data, reference.sequence.data, rtol=1e-4)
    # ALS is MLlib's own: its item vectors differ from implicit's, but they place titles as well.
    assert model.vectors.shape == reference.vectors.shape and np.isfinite(model.vectors).all()
    assert np.abs(model.vectors).sum(axis=1).min() > 0
    # The content model's viewer sample is drawn on the cluster by the same rule as the first engine's.
    ours, theirs = model.viewer_sample, reference.viewer_sample
    rates = viewer_rates(model.viewers)
    expected_pairs = float(rates @ model.viewers)
    for sample in (ours, theirs):
        counts = np.bincount(sample.item, minlength=len(catalog))
        assert np.all(counts <= model.viewers)
        np.testing.assert_allclose((counts * sample.scale)[counts > 0], model.viewers[counts > 0], rtol=1e-5)
        assert abs(len(sample.item) - expected_pairs) < 0.05 * expected_pairs
        assert np.linalg.eigvalsh(sample.gram).min() > -1e-6 * np.trace(sample.gram) and np.trace(sample.gram) > 0
    assert (np.linalg.norm(ours.factors, axis=1) > 0).all() and 0 < rates.min() <= rates.max() <= 1.0
    # ... and fits the opt-in ALS-loss content model as the first engine's does.
    placed = content_vectors(catalog, model.vectors, model.viewers, params, ours)
    assert np.isfinite(placed).all() and np.abs(placed).sum(axis=1).min() > 0


def _published_parts(store: ModelStore) -> tuple[str, dict]:
    version = store.live_version()
    assert version
    return version, store.meta(version)


def test_spark_job_publishes_a_version_the_service_serves(redis_server, redis_client, demo_files, tmp_path):
    """The job on local[2], evaluation included; the service answers from it as from the first engine's."""
    env = spark_env(REDIS_URL=redis_server.url, SPARK_LOG=str(tmp_path / "spark.log"))
    spark_run = subprocess.run(
        nightly_command(demo_files["events"], demo_files["catalog"], "--engine", "spark", "--prefix", "sp", "--n-trees", "10"),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert spark_run.returncode == 0, spark_run.stdout + spark_run.stderr
    assert "spark: ALS" in spark_run.stderr
    assert re.search(r"spark: \d+ user records written by the executors", spark_run.stderr)  # not collected by the driver
    # Spark's console noise (log4j lines, the JVM's banner, py4j) is in SPARK_LOG, not in the job's output.
    assert not re.search(r"\d\d/\d\d/\d\d \d\d:\d\d:\d\d (WARN|INFO|ERROR) ", spark_run.stderr)
    assert "log4j" not in spark_run.stderr and "py4j" not in spark_run.stderr
    assert (tmp_path / "spark.log").stat().st_size > 0
    implicit_run = subprocess.run(
        nightly_command(demo_files["events"], demo_files["catalog"], "--prefix", "im", "--n-trees", "10"),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert implicit_run.returncode == 0, implicit_run.stderr

    spark_store, implicit_store = ModelStore(redis_client, "sp"), ModelStore(redis_client, "im")
    spark_version, spark_meta = _published_parts(spark_store)
    implicit_version, implicit_meta = _published_parts(implicit_store)
    assert spark_meta["engine"] == "spark" and implicit_meta["engine"] == "implicit"
    assert spark_meta["counts"] == implicit_meta["counts"]
    assert set(spark_meta["parts"]) == set(implicit_meta["parts"])
    ndcg = {name: meta["metrics"]["model"]["ndcg@10"] for name, meta in (("spark", spark_meta), ("implicit", implicit_meta))}
    # The holdout model is trained and ranked by Spark; on 600 users it lands near the first engine's.
    assert ndcg["spark"] > spark_meta["metrics"]["popularity"]["ndcg@10"] * 0.9 and ndcg["spark"] > ndcg["implicit"] - 0.05, ndcg

    opened = {}
    for prefix in ("sp", "im"):
        client = serving(redis_server, prefix, tmp_path / f"cache-{prefix}")
        model = client.application.extensions["live_model"].current
        opened[prefix] = model
        user = model.user_ids[5]
        answer = client.get(f"/recommend?user={user}&k=10")
        assert answer.status_code == 200, answer.get_json()
        body = answer.get_json()
        assert body["strategy"] == "personalized" and len(body["items"]) == 10
        assert any(item.get("because") for item in body["items"])
        assert client.get(f"/similar?item={model.item_ids[3]}").status_code == 200
        assert client.get(f"/page?user={user}").status_code == 200
    spark_model, implicit_model = opened["sp"], opened["im"]
    assert spark_model.user_ids == implicit_model.user_ids
    np.testing.assert_array_equal(spark_model.popular, implicit_model.popular)
    assert spark_model.vectors.shape == implicit_model.vectors.shape and spark_model.vectors.dtype == implicit_model.vectors.dtype
    # Each user's record (in Redis, read as the service reads it): the same history; candidates of one layout.
    assert spark_model.user_store["users"] == implicit_model.user_store["users"] == len(spark_model.user_ids)
    for user in spark_model.user_ids[::5]:
        a, b = spark_model.user(user), implicit_model.user(user)
        np.testing.assert_array_equal(a.items, b.items)
        np.testing.assert_allclose(a.weights, b.weights, rtol=1e-4)
        for name in ("candidates", "scores", "because"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and x.shape[1:] == y.shape[1:], name


def serving(redis_server, prefix: str, cache: Path):
    """A Flask test client of the service on ``prefix``'s live version."""
    from app import create_app

    app = create_app(
        {"REDIS_URL": redis_server.url, "REDIS_PREFIX": prefix, "MODEL_CACHE_DIR": str(cache), "MODEL_WATCHER": False,
         "TESTING": True, "SEARCH_ENCODER": "off"}
    )  # fmt: skip
    app.extensions["live_model"].refresh()
    return app.test_client()


def _wait_for(url: str, ready, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                body = json.loads(answer.read())
                if ready(body):
                    return body
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready in {seconds}s")


@pytest.fixture
def standalone_cluster(tmp_path):
    """A Spark standalone master and two workers (1 core, 1 GB each) from the pyspark package, on localhost."""
    spark_home = Path(pyspark.__file__).parent
    spark_class = spark_home / "bin" / "spark-class"
    env = dict(os.environ, SPARK_HOME=str(spark_home), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               SPARK_WORKER_DIR=str(tmp_path / "work"), SPARK_LOG_DIR=str(tmp_path / "logs"), PYTHONPATH=str(REPO))  # fmt: skip
    port, ui = free_port(), free_port()
    processes = []
    logs = tmp_path / "cluster.log"
    with open(logs, "ab") as out:
        processes.append(subprocess.Popen(
            [str(spark_class), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
             "--webui-port", str(ui)], env=env, stdout=out, stderr=out,
        ))  # fmt: skip
        _wait_for(f"http://127.0.0.1:{ui}/json/", lambda body: body.get("status") == "ALIVE")
        for _ in range(2):
            processes.append(subprocess.Popen(
                [str(spark_class), "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}", "--host",
                 "127.0.0.1", "--cores", "1", "--memory", "1g", "--webui-port", str(free_port())],
                env=env, stdout=out, stderr=out,
            ))  # fmt: skip
        _wait_for(f"http://127.0.0.1:{ui}/json/", lambda body: body.get("aliveworkers") == 2)
    try:
        yield {"master": f"spark://127.0.0.1:{port}", "status": f"http://127.0.0.1:{ui}/json/", "log": logs,
               "work": tmp_path / "work"}  # fmt: skip
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def test_spark_job_on_a_standalone_cluster(redis_server, redis_client, demo_files, standalone_cluster, tmp_path):
    """The job against spark://: the work runs on the two workers' executors, the service serves the version."""
    env = spark_env(
        REDIS_URL=redis_server.url, SPARK_MASTER=standalone_cluster["master"], SPARK_EXECUTOR_MEMORY="768m",
        SPARK_DRIVER_MEMORY="1g", SPARK_LOG=str(tmp_path / "spark.log"), SPARK_PARTITIONS="4",
    )  # fmt: skip
    run = subprocess.run(
        nightly_command(demo_files["events"], demo_files["catalog"], "--engine", "spark", "--prefix", "cl", "--no-eval",
                        "--n-trees", "10"),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "spark.log").read_text()[-3000:]
    assert f"master {standalone_cluster['master']}" in run.stderr
    status = json.loads(urllib.request.urlopen(standalone_cluster["status"], timeout=5).read())
    finished = status["completedapps"]
    assert finished and finished[0]["name"] == "recs-nightly"
    # Each worker ran an executor of the job (a worker keeps one folder per executor it launched).
    executors = list(standalone_cluster["work"].glob(f"{finished[0]['id']}/*"))
    assert len(executors) == 2, executors

    version, meta = _published_parts(ModelStore(redis_client, "cl"))
    assert meta["engine"] == "spark" and meta["counts"]["events"] == 30000

    client = serving(redis_server, "cl", tmp_path / "cache")
    model = client.application.extensions["live_model"].current
    body = client.get(f"/recommend?user={model.user_ids[0]}&k=5").get_json()
    assert body["model_version"] == version and body["strategy"] == "personalized" and len(body["items"]) == 5


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids.extend(int(c) for c in (task / "children").read_text().split())
    return kids


def test_a_stopped_spark_job_publishes_nothing_and_leaves_no_jvm(redis_server, redis_client, demo_files, tmp_path):
    """SIGTERM while Spark works: exit 143, the run recorded as failed, the lock freed, the JVM gone."""
    store = ModelStore(redis_client, "kill")
    env = spark_env(REDIS_URL=redis_server.url, SPARK_LOG=str(tmp_path / "spark.log"), JOB_LOCK_TTL="60")
    job = subprocess.Popen(
        nightly_command(demo_files["events"], demo_files["catalog"], "--engine", "spark", "--prefix", "kill", "--no-eval"),
        cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen, jvm = [], None
    try:
        for line in job.stderr:  # wait until Spark is training
            seen.append(line)
            if jvm is None:
                jvm = next((p for p in _children(job.pid) if Path(f"/proc/{p}/comm").read_text().strip() == "java"), None)
            if "spark: confidences" in line:
                break
        assert jvm is not None, "".join(seen)
        job.send_signal(signal.SIGTERM)
        rest = job.stderr.read()
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 143, "".join(seen) + rest
    assert store.live_version() is None and store.versions() == []
    assert redis_client.get(store.keys.job_lock) is None
    deadline = time.monotonic() + 30
    while Path(f"/proc/{jvm}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{jvm}").exists(), "the Spark JVM outlived the job"
