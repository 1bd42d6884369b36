"""Where Optuna studies live, so a tune survives interruption and machines can share one.

Default: one append-only Optuna journal file per plan key under ``<cache>/studies`` (safe to
``kill -9``: a half-written last line is ignored). Any Optuna storage URL works instead, e.g.
``postgresql://user:pass@host/db`` for a fleet of identical servers tuning one study.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import optuna

from autocpu.errors import AutocpuError
from autocpu.search import make_sampler

log = logging.getLogger(__name__)

MACHINE_ATTR = "machine_fingerprint"
#: RDB storages get heartbeats, so trials of a machine that died are failed by the others.
HEARTBEAT_S = 60
GRACE_S = 180


def study_name(key: str) -> str:
    return f"autocpu-{key}"


def journal_path(cache_root: Path, key: str) -> Path:
    return cache_root / "studies" / f"{key}.journal"


def _journal_storage(path: Path) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path.parent.mkdir(parents=True, exist_ok=True)
    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    return optuna.storages.JournalStorage(backend)


def _url_storage(url: str) -> optuna.storages.BaseStorage:
    if url.startswith(("postgresql", "mysql", "sqlite")):
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    return optuna.storages.get_storage(url)


def _move_aside(path: Path, cache_root: Path, error: Exception) -> None:
    target = cache_root / "corrupt" / f"{path.name}.{int(time.time() * 1000)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    log.warning("corrupt study %s (%s): moved to %s", path.name, str(error)[:120], target)


def open_study(
    key: str,
    machine: str,
    cache_root: Path,
    storage: str | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> optuna.Study:
    """Create or resume the study for ``key``; refuse one measured on another machine."""
    sampler = sampler or make_sampler("tpe")
    name = study_name(key)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if storage:
            try:
                backend = _url_storage(storage)
            except Exception as error:
                raise AutocpuError(
                    f"cannot open study storage {storage!r} ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:160]})",
                    "pass an Optuna storage URL that is reachable, e.g. "
                    "postgresql://user:password@host/db",
                ) from None
        else:
            path = journal_path(cache_root, key)
            try:
                backend = _journal_storage(path)
                optuna.get_all_study_names(backend)  # reads the whole journal: corrupt?
            except Exception as error:
                _move_aside(path, cache_root, error)
                backend = _journal_storage(path)
        study = optuna.create_study(
            study_name=name,
            storage=backend,
            sampler=sampler,
            direction="minimize",
            load_if_exists=True,
        )
    finally:
        optuna.logging.set_verbosity(verbosity)
    recorded = study.user_attrs.get(MACHINE_ATTR)
    if recorded is None:
        study.set_user_attr(MACHINE_ATTR, machine)
    elif recorded != machine:
        raise AutocpuError(
            f"study {name} was measured on a machine with fingerprint {recorded}, "
            f"this one is {machine}",
            "share a study only between machines of the same fingerprint (autocpu probe)",
        )
    retried = retry_interrupted_trials(study)
    if retried:
        log.info("%d trial(s) interrupted by a killed tune are queued to run again", retried)
    return study


def retry_interrupted_trials(study: optuna.Study) -> int:
    """Mark RUNNING trials of dead local processes as FAIL and queue their points again.

    A tune killed mid-trial measured nothing there. Left failed, the point would count as
    tried: the exhaustive sampler would never return to it and a budget would lose a trial.
    """
    import psutil

    host = socket.gethostname()
    retried = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get("worker", ""))
        owner, _, pid = worker.rpartition(":")
        if owner != host or not pid.isdigit() or psutil.pid_exists(int(pid)):
            continue
        try:
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process resuming the same study got there first
        study.enqueue_trial(trial.params)
        retried += 1
    return retried
