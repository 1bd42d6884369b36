"""Where Optuna studies live, so a tune survives interruption and machines can share one.

Default: one append-only Optuna journal file per plan key under ``<cache>/studies`` (safe to
``kill -9`` or a full disk: a last record cut mid-write is cut off before the study is opened).
Any Optuna storage URL works instead, e.g. ``postgresql://user:pass@host/db`` for a fleet of
identical servers tuning one study. No message or log line shows a storage URL's password.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import time
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
#: Tries at creating an RDB storage's tables while other processes create them too, and the
#: first pause between tries (doubled each time, times a jitter of 1 to 2): 3 to 6 s in all.
SCHEMA_TRIES = 5
SCHEMA_BACKOFF_S = 0.2
#: Bytes read at a time, from the end, to find a journal's last line.
TAIL_CHUNK = 1 << 16

#: The password of a ``scheme://user:password@host`` URL: up to the last ``@`` before a space
#: or a quote, so a password holding an ``@`` or a ``/`` is masked whole.
_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*):[^\s'\"]*@")


def masked(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@...`` URL in it as ***."""
    return _PASSWORD.sub(r"\g<head>:***@", text)


def masked_line(error: BaseException, limit: int = 200) -> str:
    """:func:`one_line` of ``error`` with its passwords masked before it is cut, so that the cut
    cannot leave the start of a password unmasked."""
    return masked(one_line(error, limit=1 << 30))[:limit]


def study_name(key: str) -> str:
    return f"autocpu-{key}"


def journal_path(cache_root: Path, key: str) -> Path:
    return cache_root / "studies" / f"{key}.journal"


def _journal_storage(path: Path) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path.parent.mkdir(parents=True, exist_ok=True)
    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    return optuna.storages.JournalStorage(backend)


def last_line(path: Path) -> tuple[int, bytes]:
    """Where the file's last line starts, and that line (with its newline if it has one)."""
    with open(path, "rb") as file:
        position = file.seek(0, os.SEEK_END)
        data = b""
        while position > 0:
            step = min(TAIL_CHUNK, position)
            position -= step
            file.seek(position)
            data = file.read(step) + data
            cut = data.rfind(b"\n", 0, len(data) - 1)  # the newline before the last line
            if cut >= 0:
                return position + cut + 1, data[cut + 1 :]
        return 0, data


def is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        return False


def is_whole(line: bytes) -> bool:
    """Whether a journal whose last line is ``line`` can be appended to: it is empty, or that
    line is a newline-terminated JSON record."""
    return not line or (line.endswith(b"\n") and is_record(line))


def repair_journal(path: Path) -> None:
    """Cut off a last record that was cut mid-write (a full disk, a kill during the write).

    Optuna's reader skips a last line that lacks its newline or is not JSON, but its writer
    appends right after it: the next record glued onto the torn one makes an invalid line in
    the middle of the journal, which every later read fails on. Under the journal's own lock
    (writers append under it, so the tail cannot be a record still being written), the torn
    line is truncated away; a whole record that lacks only its newline gets the newline. Every
    complete record is kept."""
    if not path.exists() or is_whole(last_line(path)[1]):
        return
    from optuna.storages.journal import JournalFileOpenLock

    lock = JournalFileOpenLock(str(path))
    lock.acquire()
    try:
        start, line = last_line(path)
        if is_whole(line):
            return  # a writer finished its record while this process waited for the lock
        with open(path, "r+b") as file:
            if is_record(line):
                file.seek(0, os.SEEK_END)
                file.write(b"\n")
            else:
                file.truncate(start)
            file.flush()
            os.fsync(file.fileno())
    finally:
        lock.release()
    fixed = "added its newline" if is_record(line) else f"cut off its {len(line)} bytes"
    log.warning("study journal %s ended in a record cut mid-write: %s", path.name, fixed)


def _url_storage(url: str) -> optuna.storages.BaseStorage:
    if url.startswith(("postgresql", "mysql", "sqlite")):
        return _rdb_storage(url)
    return optuna.storages.get_storage(url)


def _rdb_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage, its tables created if missing. Processes creating the same tables at
    once collide in the database (PostgreSQL: a UniqueViolation on pg_type, or "relation
    already exists"); the losers try again, and then find the tables made."""
    for attempt in range(SCHEMA_TRIES - 1):
        try:
            return _new_rdb_storage(url)
        except Exception as error:
            if not _schema_collision(error):
                raise
            pause = SCHEMA_BACKOFF_S * 2**attempt * (1 + random.random())
            log.info(
                "creating the study tables in %s collided (%s): retrying in %.1f s",
                masked(url),
                masked_line(error, 120),
                pause,
            )
            time.sleep(pause)
    try:
        return _new_rdb_storage(url)
    except Exception as error:
        if not _schema_collision(error):
            raise
        raise AutocpuError(
            f"creating the study tables in {masked(url)!r} failed {SCHEMA_TRIES} times "
            f"({masked_line(error, 160)})",
            "run again (other processes were creating them at the same moment); if it fails "
            "again, check that this database user may create tables there",
        ) from None


def _new_rdb_storage(url: str) -> optuna.storages.BaseStorage:
    return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)


def _schema_collision(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is an integrity or programming error: what two
    processes creating the same tables at once get."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (IntegrityError, ProgrammingError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
            backend = _opened_url_storage(storage)
        else:
            path = journal_path(cache_root, key)
            try:
                repair_journal(path)
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


def _opened_url_storage(url: str) -> optuna.storages.BaseStorage:
    try:
        return _url_storage(url)
    except AutocpuError:
        raise
    except ImportError as error:
        raise AutocpuError(
            f"cannot open study storage {masked(url)!r} ({masked_line(error, 160)})",
            "install the driver for that database, e.g. pip install 'autocpu[postgres]'",
        ) from None
    except Exception as error:
        raise AutocpuError(
            f"cannot open study storage {masked(url)!r} ({masked_line(error, 160)})",
            "pass an Optuna storage URL that is reachable, e.g. postgresql://user:password@host/db",
        ) from None


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
