"""Where Optuna studies live, so a tune survives interruption and machines can share one.

Default: one append-only Optuna journal file per plan key under ``<cache>/studies`` (safe to
``kill -9``: a half-written last line is ignored). Any Optuna storage URL works instead, e.g.
``postgresql://user:pass@host/db`` for a fleet of identical servers tuning one study.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from autocpu.errors import AutocpuError, one_line
from autocpu.plans import move_aside, versions_id
from autocpu.search import make_sampler

if TYPE_CHECKING:
    from autocpu.options import TuneOptions

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


def in_memory_study(sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """A study that is not kept (``tune(cache=False)`` without a storage)."""
    return optuna.create_study(direction="minimize", sampler=sampler)


def study_for(
    options: TuneOptions, key: str, versions: dict[str, str], machine: str, cache_root: Path
) -> optuna.Study:
    """The tune's study: kept (journal or ``options.storage``) and keyed by the plan key and
    the package versions, so a tune resumes only under the versions that began it; in memory
    when neither the cache nor a storage is in use."""
    sampler = make_sampler(options.search)
    if not (options.cache or options.storage):
        return in_memory_study(sampler)
    study_key = f"{key}-{versions_id(versions)}"
    return open_study(study_key, machine, cache_root, options.storage, sampler)


def open_study(
    key: str,
    machine: str,
    cache_root: Path,
    storage: str | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> optuna.Study:
    """Create or resume the study for ``key``; refuse one measured on another machine.

    ``storage``: an Optuna URL, else a journal file under ``cache_root``; ``sampler``: the
    search's (Optuna's default when None)."""
    name = study_name(key)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if storage:
            try:
                backend = _url_storage(storage)
            except Exception as error:
                raise AutocpuError(
                    f"cannot open study storage {storage!r} ({one_line(error, 160)})",
                    "pass an Optuna storage URL that is reachable, e.g. "
                    "postgresql://user:password@host/db",
                ) from None
        else:
            path = journal_path(cache_root, key)
            try:
                backend = _journal_storage(path)
                optuna.get_all_study_names(backend)  # reads the whole journal: corrupt?
            except Exception as error:
                move_aside(path, cache_root, "study", error)
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
