"""A (re)load is a transaction: a broken new version, a bad config override or a model that calls
sys.exit() never takes down what serves, is reported with its reason, counted in
fastserve_model_load_failure_total and, in poll mode, never interrupts traffic (issue #14)."""

from __future__ import annotations

import json
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import VERSIONED_CONFIG, VERSIONED_MODEL, ServerProcess, write_model
from helpers import wait_until

# Each version answers with its own number, so a response proves which version ran it.


BROKEN = "raise ImportError('x')\n"


def make_model(repo: Path, name: str, versions: list[int], extra: str = "") -> Path:
    for v in versions:
        write_model(repo, name, VERSIONED_CONFIG + extra, VERSIONED_MODEL, version=v)
    return repo / name


def add_version(model: Path, version: int | str, source: str = VERSIONED_MODEL) -> None:
    (model / str(version)).mkdir()
    (model / str(version) / "model.py").write_text(textwrap.dedent(source))


def ask(url: str, model: str = "m", path: str = "") -> requests.Response:
    body = {"inputs": [{"name": "X", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
    return requests.post(f"{url}/v2/models/{model}{path}/infer", json=body, timeout=60)


def served_by(r: requests.Response) -> int:
    assert r.status_code == 200, r.text
    return next(o for o in r.json()["outputs"] if o["name"] == "V")["data"][0]


def load(server: ServerProcess, name: str = "m", config: dict | None = None) -> requests.Response:
    body = {"parameters": {"config": json.dumps(config)}} if config is not None else None
    return requests.post(f"{server.url}/v2/repository/models/{name}/load", json=body, timeout=60)


def index(server: ServerProcess) -> list[dict]:
    r = requests.post(f"{server.url}/v2/repository/index", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def row(server: ServerProcess, name: str, version: str) -> dict | None:
    return next((e for e in index(server) if e["name"] == name and e.get("version") == version), None)


def load_failures(server: ServerProcess, name: str, version: str) -> float:
    text = requests.get(server.metrics_url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "fastserve_model_load_failure_total" and s.labels == {"model": name, "version": version}:
                return s.value
    return 0.0


def ready(server: ServerProcess, path: str) -> int:
    return requests.get(f"{server.url}{path}", timeout=10).status_code


@contextmanager
def traffic(url: str) -> Iterator[list[tuple[int, int | None]]]:
    """Sends requests to model m from two threads until the block ends; yields the (status,
    version) of every answer so far."""
    stop = threading.Event()
    results: list[tuple[int, int | None]] = []

    def send() -> None:
        session = requests.Session()
        body = {"inputs": [{"name": "X", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
        while not stop.is_set():
            r = session.post(f"{url}/v2/models/m/infer", json=body, timeout=60)
            results.append((r.status_code, served_by(r) if r.status_code == 200 else None))

    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) > 0, what="the first answers")
        yield results
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_a_broken_new_version_does_not_unload_the_serving_one(start_server, tmp_path: Path) -> None:
    model = make_model(tmp_path, "m", [1])
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "m")
    add_version(model, 2, BROKEN)

    r = load(server)
    assert r.status_code == 400
    assert (
        "load failed for model 'm': version 2 is at UNAVAILABLE state: model.py raised ImportError: x"
        in r.json()["error"]
    )
    assert ready(server, "/v2/models/m/ready") == 200
    assert ready(server, "/v2/health/ready") == 200, "a failed new version does not make the server unready"
    assert served_by(ask(server.url)) == 1
    assert row(server, "m", "1") == {"name": "m", "version": "1", "state": "READY", "reason": ""}
    assert row(server, "m", "2") == {
        "name": "m",
        "version": "2",
        "state": "UNAVAILABLE",
        "reason": "model.py raised ImportError: x",
    }
    assert load_failures(server, "m", "2") == 1

    # Fixed: the next load swaps v2 in and only then drops v1.
    (model / "2" / "model.py").write_text(textwrap.dedent(VERSIONED_MODEL))
    assert load(server).status_code == 200
    assert served_by(ask(server.url)) == 2
    assert ready(server, "/v2/models/m/versions/1/ready") == 404
    assert row(server, "m", "2") == {"name": "m", "version": "2", "state": "READY", "reason": ""}
    assert load_failures(server, "m", "2") == 1


def test_one_failed_version_aborts_the_whole_load_and_finalizes_what_it_built(start_server, tmp_path: Path) -> None:
    marker = tmp_path / "finalized.log"
    finalizing = textwrap.dedent(VERSIONED_MODEL) + textwrap.dedent(f"""
        def _finalize(self):
            with open({str(marker)!r}, "a") as f:
                f.write(f"{{self.version}}\\n")

        Model.finalize = _finalize
    """)
    repo = tmp_path / "repo"
    model = make_model(repo, "m", [1], "[version_policy]\nall = true\n")
    server = start_server(repo, "--model-control-mode", "explicit", "--load-model", "m")
    add_version(model, 2, finalizing)
    add_version(model, 3, BROKEN)

    r = load(server)
    assert r.status_code == 400
    assert "version 3 is at UNAVAILABLE state: model.py raised ImportError: x" in r.json()["error"]
    assert marker.read_text() == "2\n", "version 2 was built, then finalized when version 3 failed"
    assert ready(server, "/v2/models/m/versions/2/ready") == 404, "nothing of the failed load is served"
    assert served_by(ask(server.url)) == 1
    assert row(server, "m", "3")["state"] == "UNAVAILABLE"


def test_a_failed_override_keeps_serving_and_is_not_remembered(start_server, tmp_path: Path) -> None:
    model = make_model(tmp_path, "m", [1])
    server = start_server(tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    # A good override: serve every version. Polling keeps it.
    assert load(server, config={"version_policy": {"all": True}}).status_code == 200

    r = load(server, config={"max_batch_size": -5})
    assert r.status_code == 400
    assert "version 1 is at UNAVAILABLE state: max_batch_size must be >= 0 and <= 1048576, got -5" in r.json()["error"]
    assert served_by(ask(server.url)) == 1
    assert load_failures(server, "m", "1") == 1

    # The next poll reloads with the override that serves ({"all": true}), not the failed one:
    # v2 is added beside v1 instead of failing on max_batch_size = -5.
    add_version(model, 2)
    wait_until(lambda: (row(server, "m", "2") or {}).get("state") == "READY", what="version 2 ready")
    assert served_by(ask(server.url, path="/versions/1")) == 1
    assert served_by(ask(server.url)) == 2
    assert all(e["reason"] == "" for e in index(server) if e["name"] == "m")


def test_poll_mode_serves_on_while_a_broken_version_appears(start_server, tmp_path: Path) -> None:
    model = make_model(tmp_path, "m", [1])
    server = start_server(tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    with traffic(server.url) as results:
        add_version(model, 2, BROKEN)
        failed = wait_until(
            lambda: (r := row(server, "m", "2")) is not None and r["state"] == "UNAVAILABLE" and r,
            what="the index to show version 2's failure (not its LOADING row)",
        )
        seen = len(results)
        wait_until(lambda: len(results) > seen, what="answers after the failure")
    assert failed == {"name": "m", "version": "2", "state": "UNAVAILABLE", "reason": "model.py raised ImportError: x"}
    errors = [r for r in results if r[0] != 200]
    assert not errors, f"{len(errors)} of {len(results)} requests failed: {errors[:5]}"
    assert {v for _, v in results} == {1}

    # The same failure is not retried on every poll: once a later model ("zz", polled after "m")
    # has loaded, "m" has been polled again, and still counts one failure.
    make_model(tmp_path, "zz", [1])
    server.wait_for_log("loaded model 'zz' version 1")
    assert load_failures(server, "m", "2") == 1
    assert served_by(ask(server.url)) == 1


def test_version_directories_beyond_the_version_range_are_skipped(start_server, tmp_path: Path) -> None:
    model = make_model(tmp_path, "m", [1])
    add_version(model, "1" * 30)  # does not fit a u64
    add_version(model, 2**63)  # above the int64 the APIs carry
    add_version(model, "007")  # leading zeros: would be a second name of version 7
    server = start_server(tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    assert served_by(ask(server.url)) == 1
    assert "ignoring version directory" in server.log() and "1" * 30 in server.log()
    assert [e.get("version") for e in index(server) if e["name"] == "m"] == ["1"]
    # The poll thread lives on: a new version is still picked up.
    add_version(model, 2)
    server.wait_for_log("loaded model 'm' version 2")
    assert served_by(ask(server.url)) == 2


def test_sys_exit_in_a_model_fails_only_that_model(start_server, tmp_path: Path) -> None:
    make_model(tmp_path, "good", [1])
    write_model(tmp_path, "exits_on_import", VERSIONED_CONFIG, "import sys\nsys.exit(3)\n")
    at_init = textwrap.dedent(VERSIONED_MODEL).replace(
        'self.version = args["model_version"]', "raise SystemExit('bye')"
    )
    write_model(tmp_path, "exits_on_init", VERSIONED_CONFIG, at_init)
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "good")
    r = load(server, "exits_on_import")
    assert r.status_code == 400 and "model.py raised SystemExit: 3" in r.json()["error"]
    r = load(server, "exits_on_init")
    assert r.status_code == 400 and "initialize() raised SystemExit: bye" in r.json()["error"]
    assert served_by(ask(server.url, "good")) == 1
    assert server.proc.poll() is None


def test_a_first_load_that_fails_is_explained_by_ready_answers(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "m", VERSIONED_CONFIG, BROKEN)
    make_model(tmp_path, "good", [1])
    server = start_server(tmp_path)
    r = requests.get(f"{server.url}/v2/models/m/ready", timeout=10)
    assert r.status_code == 400 and "model.py raised ImportError: x" in r.json()["error"]
    assert served_by(ask(server.url, "good")) == 1
    assert load_failures(server, "m", "1") == 1
