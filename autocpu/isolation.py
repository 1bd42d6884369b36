"""Trials in worker processes, so a crashing, hanging or memory-hungry backend cannot take the
user's process down or leave threads behind that slow the next measurement.

Each job runs in a fresh ``python -m autocpu.isolation JOB RESULT`` process: a plain subprocess
rather than multiprocessing, so the user's ``__main__`` is never re-imported. Thread variables
are set in its environment before torch, ONNX Runtime or OpenVINO load. The model reaches the
worker as a saved copy; inputs and reference outputs travel pickled.

A worker never outlives the tuner that started it, nor leaves its folder behind: the tuner kills
it on any exit it survives (an error, a caught Ctrl-C), and a worker whose tuner is gone (killed
with SIGKILL) is killed and its folder removed by :func:`guard_worker`. This module imports
nothing heavy at its top, so that guard is in place before torch loads.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing.connection
import os
import pickle
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from autocpu.errors import AutocpuWarning
from autocpu.records import FAILED, TrialRecord

if TYPE_CHECKING:  # both import torch: not before guard_worker has run
    from autocpu.options import TuneOptions
    from autocpu.trials import Executor, TrialRunner
    from autocpu.workloads import Workload

#: Seconds between checks of a worker's memory and clock.
POLL_S = 0.1
#: Every worker's folder is named so; a worker removes only a folder of that name.
FOLDER_PREFIX = "autocpu-worker-"
#: A worker's environment: the tuner's pid, and the descriptor of the tuner's lifeline.
PARENT_ENV = "AUTOCPU_WORKER_PARENT"
LIFELINE_ENV = "AUTOCPU_WORKER_LIFELINE"
#: A warm worker's environment: the descriptor of its socket to the tuner.
CHANNEL_ENV = "AUTOCPU_WORKER_CHANNEL"
#: prctl option: the kernel sends the signal when the thread that started this process ends.
PR_SET_PDEATHSIG = 1


@dataclass
class WorkerJob:
    """Everything a worker needs to rebuild the TrialRunner: all picklable, no model object."""

    model_dir: str
    model_class: str
    attention: str
    task: str
    fingerprint: dict[str, str]
    workload: Workload
    references: list[Any]
    tolerance: Any
    artifact_dir: str
    default_threads: int


class IsolatedExecutor:
    """Runs each trial, and the finals, in a fresh worker process."""

    mode = "worker processes"

    def __init__(self, job: WorkerJob, trial_timeout: float, memory_limit_bytes: int) -> None:
        self.job = job
        self.trial_timeout = trial_timeout
        self.memory_limit = memory_limit_bytes

    def run(self, record: TrialRecord, give_up_above_ms: float | None = None) -> TrialRecord:
        task = ("trial", record, give_up_above_ms)
        outcome = self._spawn(task, self.threads(record), self.trial_timeout)
        return record.fail(FAILED, outcome) if isinstance(outcome, str) else outcome

    @property
    def workload(self) -> Workload:
        return self.job.workload

    def contender(self, record: TrialRecord | None) -> WarmWorker:
        return WarmWorker(self, record)

    def threads(self, record: TrialRecord | None) -> int:
        """The threads ``record``'s candidate runs with (the baseline: torch's default)."""
        return (record.params.get("threads") if record else None) or self.job.default_threads

    def start(
        self, folder: Path, task: tuple, threads: int, channel: int | None = None
    ) -> subprocess.Popen:
        """Start a worker on ``task`` in ``folder`` (its job, result and log files), with
        ``channel`` (a socket descriptor) passed on for a warm worker."""
        job_path, result_path, log_path = (folder / n for n in ("job", "result", "log"))
        job_path.write_bytes(pickle.dumps((self.job, task)))
        line = lifeline()
        env = {
            **os.environ,
            **thread_env(threads),
            PARENT_ENV: str(os.getpid()),
            LIFELINE_ENV: str(line),
        }
        if channel is not None:
            env[CHANNEL_ENV] = str(channel)
        with open(log_path, "wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "autocpu.isolation", str(job_path), str(result_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Its own process group, so that kill() and the worker's janitor reach
                # everything the worker started, and a terminal's Ctrl-C (SIGINT to the
                # foreground group) reaches only this process, which kills the worker
                # whether or not the interrupt is then caught.
                start_new_session=True,
                pass_fds=(line,) if channel is None else (line, channel),
            )

    def _spawn(self, task: tuple, threads: int, timeout: float) -> Any:
        """Run ``task`` in a worker; its result, or a one-line reason why there is none."""
        with tempfile.TemporaryDirectory(prefix=FOLDER_PREFIX) as tmp:
            folder = Path(tmp)
            process = self.start(folder, task, threads)
            try:
                problem = self._watch(process, timeout)
            finally:
                if process.poll() is None:  # interrupted or failed while watching
                    kill(process)
            result_path = folder / "result"
            if problem is None and result_path.exists():
                return pickle.loads(result_path.read_bytes())
            if problem is None:
                problem = exit_reason(process.returncode)
            return f"{problem}{last_line(folder / 'log')}"

    def _watch(self, process: subprocess.Popen, timeout: float) -> str | None:
        """Wait for the worker; kill it past the timeout or the memory limit."""
        started = time.monotonic()
        while process.poll() is None:
            problem = overstepped(process, started, timeout, self.memory_limit)
            if problem is not None:
                kill(process)
                return problem
            time.sleep(POLL_S)
        return None


def overstepped(
    process: subprocess.Popen, since: float, timeout: float, memory_limit: int
) -> str | None:
    """Why a worker busy since ``since`` (monotonic) must be killed, or None."""
    if time.monotonic() - since > timeout:
        return f"hung: no result after {timeout:.0f} s (trial timeout)"
    rss = tree_rss(process.pid)
    if rss > memory_limit:
        return f"exceeded the memory limit: {rss / 2**30:.1f} GiB > {memory_limit / 2**30:.1f} GiB"
    return None


def send(channel: multiprocessing.connection.Connection, message: Any) -> None:
    """Send ``message`` pickled plainly: tensors by value. (The connection's own pickler has
    torch's reductions, which pass tensors as shared-memory handles that the other process must
    fetch from a multiprocessing server this process does not run.)"""
    channel.send_bytes(pickle.dumps(message))


def receive(channel: multiprocessing.connection.Connection) -> Any:
    return pickle.loads(channel.recv_bytes())


#: Starts a warm process in a folder (where it writes its ``log``), passing it a socket.
StartProcess = Callable[[Path, int], subprocess.Popen]


class WarmProcess:
    """A process built once and kept warm, answering requests (a method name and its arguments)
    over a socket; while others run it waits on that socket, so it never shares its process,
    or its CPUs, with another runtime. Each request, the first (the build) included, has
    ``timeout`` seconds and ``memory_limit`` bytes; a process that fails, crashes, hangs or
    overgrows is killed and the caller gets ``error`` with one line saying why. The other end
    is :func:`answer_requests`."""

    def __init__(
        self,
        name: str,
        start: StartProcess,
        timeout: float,
        memory_limit: int,
        error: type[Exception] = RuntimeError,
    ) -> None:
        self.name, self.timeout, self.memory_limit, self._error = name, timeout, memory_limit, error
        self._folder = tempfile.TemporaryDirectory(prefix=FOLDER_PREFIX)
        ours, theirs = socket.socketpair()
        try:
            self.process = start(Path(self._folder.name), theirs.fileno())
        except BaseException:
            ours.close()
            self._folder.cleanup()
            raise
        finally:
            theirs.close()
        self.channel = multiprocessing.connection.Connection(ours.detach())
        try:
            self._answer()  # built, or why not
        except BaseException:
            self.close()
            raise

    def ask(self, request: str, *args: Any) -> Any:
        try:
            send(self.channel, (request, args))
        except OSError as error:
            raise self._error(f"{self.name}'s worker is gone: {error}") from error
        return self._answer()

    def close(self) -> None:
        """End the process and remove its folder (it is killed if it does not end at once)."""
        with contextlib.suppress(OSError):
            send(self.channel, ("close", ()))
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        if self.process.poll() is None:
            kill(self.process)
        self.channel.close()
        self._folder.cleanup()

    def _answer(self) -> Any:
        since = time.monotonic()
        while not self.channel.poll(POLL_S):
            if self.process.poll() is not None:
                raise self._gone()
            problem = overstepped(self.process, since, self.timeout, self.memory_limit)
            if problem is not None:
                kill(self.process)
                raise self._error(f"{self.name}'s worker {problem}")
        try:
            succeeded, value = receive(self.channel)
        except EOFError:
            raise self._gone() from None
        if not succeeded:
            raise self._error(value)
        return value

    def _gone(self) -> Exception:
        """The error for a process that ended without answering: how it ended, its last line."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        if self.process.poll() is None:
            kill(self.process)
        problem = exit_reason(self.process.returncode)
        return self._error(f"{self.name} {problem}{last_line(Path(self._folder.name) / 'log')}")


class WarmWorker(WarmProcess):
    """A finals contender (a :class:`~autocpu.finals.Contender`) in a worker process of its
    own, with the trial timeout and the memory limit per request; it fails with one-line
    :class:`~autocpu.finals.FinalsError` messages."""

    def __init__(self, executor: IsolatedExecutor, record: TrialRecord | None) -> None:
        from autocpu.finals import FinalsError, contender_name  # import torch: not at the top

        def start(folder: Path, channel: int) -> subprocess.Popen:
            return executor.start(folder, ("serve", record), executor.threads(record), channel)

        limits = (executor.trial_timeout, executor.memory_limit)
        super().__init__(contender_name(record), start, *limits, error=FinalsError)

    def check_second_length(self) -> Any:
        return self.ask("check_second_length")

    def turn(self, settle_calls: int) -> float:
        return self.ask("turn", settle_calls)

    def generation_stats(self) -> Any:
        return self.ask("generation_stats")


def choose_executor(trial_runner: TrialRunner, options: TuneOptions) -> Executor:
    """Worker processes unless asked otherwise or the model cannot be saved for them."""
    if options.isolation == "none":
        return trial_runner
    import transformers

    from autocpu.backends.eager import current_attention
    from autocpu.outputs import named_tensors

    spec = trial_runner.spec
    model_class = type(spec.model).__name__
    if not hasattr(spec.model, "save_pretrained") or not hasattr(transformers, model_class):
        warnings.warn(
            f"{model_class} cannot be saved for worker processes: trials run in this process",
            AutocpuWarning,
            stacklevel=5,
        )
        return trial_runner
    job = WorkerJob(
        model_dir=str(spec.saved_copy(trial_runner.ctx.artifact_dir)),
        model_class=model_class,
        attention=current_attention(spec.model),
        task=spec.task,
        fingerprint=spec.fingerprint,
        workload=trial_runner.workload,
        references=[named_tensors(r) for r in trial_runner.references],
        tolerance=trial_runner.tolerance,
        artifact_dir=str(trial_runner.ctx.artifact_dir),
        default_threads=trial_runner.default_threads,
    )
    memory = options.memory_limit_gb
    limit = int(memory * 2**30) if memory else int(psutil.virtual_memory().total * 0.8)
    return IsolatedExecutor(job, options.trial_timeout, limit)


def thread_env(threads: int) -> dict[str, str]:
    """Thread settings every runtime reads at start-up."""
    value = str(max(int(threads), 1))
    return {"OMP_NUM_THREADS": value, "MKL_NUM_THREADS": value, "TOKENIZERS_PARALLELISM": "false"}


def exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"crashed: killed by {signal.Signals(-code).name}"
    return f"crashed: worker exited with code {code} and no result"


def last_line(log_path: Path) -> str:
    """The worker's last output line, for the failure reason."""
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    return f" ({lines[-1].strip()[:200]})" if lines else ""


def tree_rss(pid: int) -> int:
    try:
        parent = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
    except psutil.Error:
        return 0


def kill(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the worker and anything it started
    process.wait()


_lifeline_lock = threading.Lock()
_lifeline: tuple[int, int] | None = None


def lifeline() -> int:
    """The read end of a pipe that nothing writes to and whose write end only this process
    holds, until it ends: a worker's janitor reads end-of-file from it exactly when this process
    has ended, however it ended. Both ends are close-on-exec, so no program this process runs
    holds them, and a child it forks closes them (:func:`_forget_lifeline`)."""
    global _lifeline
    with _lifeline_lock:
        if _lifeline is None:
            _lifeline = os.pipe()
        return _lifeline[0]


def _forget_lifeline() -> None:
    """In a forked child: close the parent's lifeline (the child makes its own when it needs
    one), and take a fresh lock, as another thread may have held the parent's at the fork."""
    global _lifeline, _lifeline_lock
    _lifeline_lock = threading.Lock()
    if _lifeline is not None:
        for end in _lifeline:
            with contextlib.suppress(OSError):
                os.close(end)
        _lifeline = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_lifeline)


# Worker side ------------------------------------------------------------------------------------


def _trial_runner(job: WorkerJob) -> Any:
    import torch
    import transformers

    from autocpu.backends import BuildContext
    from autocpu.hardware import probe
    from autocpu.models import ModelSpec
    from autocpu.trials import TrialRunner

    torch.set_num_threads(job.default_threads)
    model_class = getattr(transformers, job.model_class)
    model = model_class.from_pretrained(job.model_dir, attn_implementation=job.attention).eval()
    resident(model)
    spec = ModelSpec(model, job.task, job.fingerprint, workload=job.workload.name)
    new_tokens = job.workload.settings().get("max_new_tokens")
    ctx = BuildContext(probe(), job.workload.batches, Path(job.artifact_dir), new_tokens)
    return TrialRunner(spec, job.workload, job.references, job.tolerance, ctx)


def resident(model: Any) -> None:
    """Copy memory-mapped weights into process memory before anything is timed.

    from_pretrained maps safetensors files lazily; with a cold page cache the first forward
    passes read the file from disk (on a 2-vCPU VM bert-base took ~1 s per call for the first
    few seconds, then 70 ms), which would be booked as the candidate's latency.
    """
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


def worker_main(job_path: str, result_path: str) -> None:
    job, task = pickle.loads(Path(job_path).read_bytes())
    runner = _trial_runner(job)
    if task[0] == "serve":
        serve(runner, task[1], channel_to_parent())
        return
    _, record, give_up = task
    result = runner.run(record, give_up_above_ms=give_up)
    partial = Path(result_path + ".partial")
    partial.write_bytes(pickle.dumps(result))
    partial.rename(result_path)


def serve(runner: TrialRunner, record: TrialRecord | None, channel: Any) -> None:
    """Serve ``record``'s finals contender (None: the baseline) to the tuner."""
    from autocpu.finals import FinalsError, contender_name
    from autocpu.trials import InProcessContender

    def build() -> InProcessContender:
        return InProcessContender(runner, record)

    answer_requests(build, contender_name(record), channel, explained=(FinalsError,))


def channel_to_parent() -> multiprocessing.connection.Connection:
    """In a process a :class:`WarmProcess` started: its socket to that process."""
    return multiprocessing.connection.Connection(int(os.environ[CHANNEL_ENV]))


def answer_requests(
    build: Callable[[], Any],
    name: str,
    channel: Any,
    explained: tuple[type[Exception], ...] = (),
) -> None:
    """The far end of a :class:`WarmProcess`: build the served object, say whether that worked,
    then answer requests (a method of it and its arguments) until told to close or the other end
    is gone. Each answer goes once this process's threads are idle (a runtime's pool spinning
    on after a call would run into the next process's turn). Failures are answered in one line
    naming ``name``; a build error of an ``explained`` type already is that line."""
    from autocpu.errors import one_line
    from autocpu.measure import wait_until_idle

    try:
        served = build()
    except explained as error:
        send(channel, (False, str(error)))
        return
    except Exception as error:
        send(channel, (False, f"{name} could not be built: {one_line(error)}"))
        return
    wait_until_idle()
    send(channel, (True, None))
    while True:
        try:
            request, args = receive(channel)
        except EOFError:
            return
        if request == "close":
            return
        try:
            answer = (True, getattr(served, request)(*args))
        except Exception as error:
            answer = (False, f"{name} failed in its worker: {one_line(error)}")
        wait_until_idle()
        send(channel, answer)


def guard_worker(job_path: str) -> None:
    """Make this worker end when the tuner that started it ends, and then leave no folder.

    Run first, before torch loads. On Linux the kernel SIGKILLs the worker when the thread that
    started it ends (PR_SET_PDEATHSIG); that thread waits in ``_watch`` until the worker has
    exited, so it ends early only with the whole tuner. A tuner that died before the prctl took
    effect shows as a changed parent pid. A janitor process, forked here before any thread
    exists, then waits for the worker or the tuner to end: a process rather than a thread in
    the worker, because no thread runs while a hung native call holds the GIL, and because on
    systems without PR_SET_PDEATHSIG it is what ends an orphaned worker.
    """
    parent, line = os.environ.get(PARENT_ENV), os.environ.get(LIFELINE_ENV)
    if parent is None or line is None:
        return  # not started by IsolatedExecutor: nothing to guard
    folder = Path(job_path).parent
    die_with_parent()
    if os.getppid() != int(parent):
        remove_folder(folder)
        os._exit(1)
    start_janitor(folder, int(line))


def die_with_parent() -> None:
    """Linux only: have the kernel SIGKILL this process when its parent thread ends."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def start_janitor(folder: Path, tuner_line: int) -> None:
    """Fork the janitor of this worker; the worker holds the write end of the janitor's pipe
    until it exits (close-on-exec: programs the worker runs do not hold it)."""
    if not hasattr(os, "fork"):
        return
    worker_pid = os.getpid()
    worker_read, worker_write = os.pipe()
    if os.fork() != 0:
        os.close(worker_read)
        os.close(tuner_line)  # only the janitor watches the tuner
        return
    os.close(worker_write)
    channel = os.environ.get(CHANNEL_ENV)
    if channel is not None:  # the tuner sees the worker's end of it close when the worker dies
        with contextlib.suppress(OSError):
            os.close(int(channel))
    try:
        janitor(folder, tuner_line, worker_read, worker_pid)
    finally:
        os._exit(0)


def janitor(folder: Path, tuner_line: int, worker_line: int, worker_pid: int) -> None:
    """Wait until the tuner or the worker has ended (end-of-file on its pipe). Once the tuner
    has ended, kill the worker, remove its folder, then kill its process group: whatever the
    worker started, and this process. A worker that ended under a live tuner leaves its folder
    to the tuner."""
    ended, _, _ = select.select([tuner_line, worker_line], [], [])
    if tuner_line not in ended and not tuner_ended_first(folder, tuner_line):
        return
    if os.getppid() == worker_pid:  # still this process's parent: alive, its pid not reused
        os.kill(worker_pid, signal.SIGKILL)
    remove_folder(folder)
    if os.getpgrp() == worker_pid:  # the worker leads its own group, as _spawn starts it
        os.killpg(worker_pid, signal.SIGKILL)


def tuner_ended_first(folder: Path, tuner_line: int) -> bool:
    """After the worker has ended: whether the tuner ended before it removed the folder (as it
    does once its worker has exited). Its end can show only after the worker's: the kernel
    kills the worker when the tuner's thread ends, but closes the tuner's files (the lifeline)
    only once its last thread has ended and its memory is unmapped."""
    while folder.exists():
        if select.select([tuner_line], [], [], POLL_S)[0]:
            return True
    return False


def remove_folder(folder: Path) -> None:
    """Remove a worker's folder; any other folder is left alone."""
    if folder.name.startswith(FOLDER_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    guard_worker(sys.argv[1])
    worker_main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: some runtimes crash in their atexit handlers
