"""Study storages: a journal cut mid-write, passwords in messages, tables created concurrently."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import tiny_inputs, tiny_model

import autocpu
from autocpu.errors import AutocpuError
from autocpu.plans import PlanCache
from autocpu.storage import open_study

TESTS = str(Path(__file__).parent)

#: A tune in a process of its own, so that it has ended (as a tune on a full disk would) when
#: the next one opens its study; prints the plan's key and its measured candidates.
FIRST_TUNE = """
import json
from conftest import tiny_inputs, tiny_model
import autocpu
from test_storage_hardening import candidates
tuned = autocpu.tune(tiny_model("bert"), tiny_inputs("bert"), n_trials=2, backends=["eager"],
                     isolation="none")
print(json.dumps({"key": tuned.plan.key, "candidates": candidates(tuned.plan)}))
"""


def candidates(plan: autocpu.Plan) -> list[list]:
    """The plan's measured candidates (not the baseline, measured again by every tune)."""
    found = [
        [t.backend, json.dumps(t.params, sort_keys=True), t.median_ms]
        for t in plan.trials
        if not t.is_baseline
    ]
    return sorted(found)


def test_a_journal_whose_last_record_was_cut_mid_write_resumes(cache_dir, caplog):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", FIRST_TUNE], env=env, capture_output=True, text=True, check=True
    ).stdout
    first = json.loads(out.splitlines()[-1])
    assert len(first["candidates"]) == 2
    (journal,) = (cache_dir / "studies").glob("*.journal")
    data = journal.read_bytes()
    last = data.rindex(b"\n", 0, len(data) - 1) + 1
    journal.write_bytes(data[: last + (len(data) - last) // 2])  # the disk filled up mid-line
    PlanCache().remove(first["key"])
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    for _ in range(2):
        with caplog.at_level(logging.WARNING, logger="autocpu.storage"):
            tuned = autocpu.tune(model, inputs, n_trials=2, backends=["eager"], isolation="none")
        assert tuned.plan.study_trials == 2
        assert candidates(tuned.plan) == first["candidates"]  # reused, none measured again
        PlanCache().remove(first["key"])
    assert caplog.text.count("ended in a record cut mid-write") == 1  # cut off once
    assert not (cache_dir / "corrupt").exists()
    assert journal.read_bytes().startswith(data[:last])  # every complete record kept


@pytest.mark.parametrize(
    "url", ["postgresql://u:s3cret@127.0.0.1:1/db", "mysql://u:s3cret@127.0.0.1:1/db"]
)
def test_no_error_shows_the_storage_password(url, tmp_path):
    with pytest.raises(AutocpuError) as raised:
        open_study("key", "machine", tmp_path, storage=url)
    assert "s3cret" not in str(raised.value)
    assert "u:***@127.0.0.1:1/db" in str(raised.value)


POSTGRES = os.environ.get("AUTOCPU_TEST_POSTGRES")

#: Says it is ready, waits for the start file, then opens the study storage on its command line.
OPENER = """
import os, sys, time
from pathlib import Path
from autocpu.storage import open_study
start = Path(sys.argv[1])
(start.parent / f"ready-{os.getpid()}").touch()
while not start.exists():
    time.sleep(0.001)
open_study("race", "machine", sys.argv[3], storage=sys.argv[2])
print("opened")
"""


@pytest.mark.skipif(not POSTGRES, reason="set AUTOCPU_TEST_POSTGRES (.ci/run starts a server)")
def test_processes_creating_a_fresh_postgresql_storage_at_once_all_succeed(tmp_path):
    import sqlalchemy

    schema = f"autocpu_race_{os.getpid()}_{time.monotonic_ns()}"
    engine = sqlalchemy.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    try:
        separator = "&" if "?" in POSTGRES else "?"
        url = f"{POSTGRES}{separator}options=-csearch_path%3D{schema}"  # a fresh, empty schema
        start = tmp_path / "start"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPENER, str(start), url, str(tmp_path / f"cache{i}")],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(4)
        ]
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        start.touch()  # all at once: a fresh schema, so each of them creates the tables
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0] * len(procs), outputs
        assert optuna.get_all_study_names(url) == ["autocpu-race"]
    finally:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()
