"""The run directory: whole-or-nothing writes, one run at a time, any path epath accepts."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from etils import epath

from plug_jax import workdir
from plug_jax.data import history

REPO = Path(__file__).resolve().parents[1]


def test_an_interrupted_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "metrics.json"
    workdir.write_json(target, {"mae": 1.0})
    with pytest.raises(KeyboardInterrupt):
        with workdir.open_atomic(target) as file:
            file.write('{"mae": ')
            raise KeyboardInterrupt  # a kill between two writes
    assert json.loads(target.read_text()) == {"mae": 1.0}
    assert os.listdir(tmp_path) == ["metrics.json"]  # no temporary left over
    workdir.write_json(target, {"mae": 0.5})
    assert json.loads(target.read_text()) == {"mae": 0.5}


def test_json_lines_grow_by_whole_lines_across_runs(tmp_path):
    log = workdir.JsonLines(tmp_path / "train_metrics.jsonl")
    log.append({"step": 1})
    again = workdir.JsonLines(tmp_path / "train_metrics.jsonl")  # a resumed run
    again.append({"step": 2})
    lines = (tmp_path / "train_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


HOLDER = """
import sys, time
from plug_jax import workdir
workdir.Lock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_live_run_holds_the_workdir_and_a_dead_ones_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(tmp_path)],
                              cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir.WorkdirError) as refused:
            workdir.Lock(tmp_path).acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"pid {holder.pid} on {socket.gethostname()}" in message
        assert str(tmp_path / workdir.LOCK_FILE) in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())["pid"] == holder.pid  # stale
    with workdir.Lock(tmp_path) as lock:
        assert lock.holder()["pid"] == os.getpid()
    assert not (tmp_path / workdir.LOCK_FILE).exists()
    assert sorted(os.listdir(tmp_path)) == []  # the stale lock and temporaries are gone


def test_a_lock_from_another_host_expires_unless_refreshed(tmp_path):
    lock_file = tmp_path / workdir.LOCK_FILE
    now = time.time()
    lock_file.write_text(json.dumps({"host": "worker-of-a-deleted-slice", "pid": 1,
                                     "since": now - 3600, "updated": now - 60}))
    with pytest.raises(workdir.WorkdirError, match="pid 1 on worker-of-a-deleted-slice"):
        workdir.Lock(tmp_path, stale_after_s=600).acquire()
    with workdir.Lock(tmp_path, stale_after_s=30, refresh_s=0.05) as lock:  # 60 s: expired
        first = lock.holder()
        assert first["pid"] == os.getpid()
        time.sleep(0.5)
        assert lock.holder()["updated"] > first["updated"]  # refreshed while held
    assert not lock_file.exists()


@pytest.fixture
def bucket(tmp_path):
    """gs://bucket/... served from tmp_path/bucket/... through epath's mocked backend."""

    def local(path):
        text = os.fspath(path)
        return os.fspath(tmp_path / text[len("gs://"):]) if text.startswith("gs://") else text

    def remote(path):
        text = os.fspath(path)
        return "gs://" + text[len(os.fspath(tmp_path)) + 1:] if text.startswith(
            os.fspath(tmp_path)) else text

    def one_path(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def two_paths(original, path, dst, *args, **kwargs):
        return original(local(path), local(dst), *args, **kwargs)

    def glob(original, pattern):
        return [remote(p) for p in original(local(pattern))]

    with epath.testing.mock_epath(
            open=one_path, exists=one_path, isdir=one_path, listdir=one_path, makedirs=one_path,
            mkdir=one_path, remove=one_path, rmtree=one_path, stat=one_path, walk=one_path,
            rename=two_paths, replace=two_paths, copy=two_paths, glob=glob):
        yield tmp_path / "bucket"


def test_run_files_go_to_a_bucket_workdir(bucket):
    from plug_jax import evaluate, report
    from plug_jax.data import lamp

    run = epath.Path("gs://bucket/runs/lamp3")
    with workdir.Lock(run):
        assert json.loads((bucket / "runs/lamp3/run.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(workdir.WorkdirError, match=f"pid {os.getpid()}"):
            workdir.Lock(run).acquire()  # no exclusive create on a bucket: checked, then written
    assert not (bucket / "runs/lamp3/run.lock").exists()

    results = {"pplug": {"dev": {"mae": 0.5, "rmse": 0.75}}}
    assert evaluate.write_metrics(results, run) == run / "metrics.json"
    lamp.write_predictions(run / "predictions_pplug_dev.json", "LaMP_3", ["1", "2"], ["4", "5"])
    log = workdir.JsonLines(run / "train_metrics.jsonl")
    log.append({"step": 1, "lr": 0.0, "loss": 2.0})
    log.append({"step": 2, "lr": 1e-3, "loss": 1.5})
    report.write_run_report(run, "LaMP_3", method="pplug")

    embeddings = np.arange(6, dtype=np.float32).reshape(3, 2)
    table = history.build_history_table([["a", "b"], ["c"]], lambda texts: embeddings[:len(texts)],
                                        2, "encoder", run / "cache")
    assert table.path.exists() and os.fspath(table.path).startswith("gs://bucket/runs/lamp3/cache/")
    again = history.build_history_table([["a", "b"], ["c"]], lambda texts: 1 / 0, 2, "encoder",
                                        run / "cache")  # read back: nothing to encode
    np.testing.assert_array_equal(again.embeddings, table.embeddings)

    on_disk = bucket / "runs/lamp3"
    assert json.loads((on_disk / "metrics.json").read_text()) == results
    assert lamp.read_outputs(on_disk / "predictions_pplug_dev.json") == (
        "LaMP_3", {"1": "4", "2": "5"})
    assert "loss 2.0000 at step 1 -> 1.5000 at step 2" in (on_disk / "report.md").read_text()
    assert (on_disk / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((on_disk / "cache").glob("history-*.safetensors"))) == 1
    leftovers = [p for p in on_disk.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
    assert not Path("gs:").exists()  # nothing went to a relative "gs:" directory
