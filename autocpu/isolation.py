"""Trials in worker processes, so a crashing, hanging or memory-hungry backend cannot take the
user's process down or leave threads behind that slow the next measurement.

Each job runs in a fresh ``python -m autocpu.isolation JOB RESULT`` process: a plain subprocess
rather than multiprocessing, so the user's ``__main__`` is never re-imported. Thread variables
are set in its environment before torch, ONNX Runtime or OpenVINO load. The model reaches the
worker as a saved copy; inputs and reference outputs travel pickled.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from autocpu.errors import AutocpuWarning
from autocpu.finals import Finals
from autocpu.records import FAILED, TrialRecord
from autocpu.workloads import Workload

if TYPE_CHECKING:
    from autocpu.options import TuneOptions
    from autocpu.trials import Executor, TrialRunner

#: Seconds between checks of a worker's memory and clock.
POLL_S = 0.1


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
        threads = record.params.get("threads") or self.job.default_threads
        outcome = self._spawn(("trial", record, give_up_above_ms), threads, self.trial_timeout)
        return record.fail(FAILED, outcome) if isinstance(outcome, str) else outcome

    def finals(self, candidates: list[TrialRecord]) -> Finals:
        timeout = self.trial_timeout * 4
        outcome = self._spawn(("finals", candidates), self.job.default_threads, timeout)
        if isinstance(outcome, str):
            raise RuntimeError(f"the final comparison failed: {outcome}")
        return outcome

    def _spawn(self, task: tuple, threads: int, timeout: float) -> Any:
        """Run ``task`` in a worker; its result, or a one-line reason why there is none."""
        with tempfile.TemporaryDirectory(prefix="autocpu-worker-") as tmp:
            job_path, result_path, log_path = (Path(tmp) / n for n in ("job", "result", "log"))
            job_path.write_bytes(pickle.dumps((self.job, task)))
            env = {**os.environ, **thread_env(threads)}
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "autocpu.isolation", str(job_path), str(result_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
                problem = self._watch(process, timeout)
            if problem is None and result_path.exists():
                return pickle.loads(result_path.read_bytes())
            if problem is None:
                problem = exit_reason(process.returncode)
            return f"{problem}{last_line(log_path)}"

    def _watch(self, process: subprocess.Popen, timeout: float) -> str | None:
        """Wait for the worker; kill it past the timeout or the memory limit."""
        started = time.monotonic()
        while process.poll() is None:
            if time.monotonic() - started > timeout:
                kill(process)
                return f"hung: no result after {timeout:.0f} s (trial timeout)"
            rss = tree_rss(process.pid)
            if rss > self.memory_limit:
                kill(process)
                return (
                    f"exceeded the memory limit: {rss / 2**30:.1f} GiB > "
                    f"{self.memory_limit / 2**30:.1f} GiB"
                )
            time.sleep(POLL_S)
        return None


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
    spec = ModelSpec(model=model, task=job.task, fingerprint=job.fingerprint)
    ctx = BuildContext(probe(), job.workload.batches, Path(job.artifact_dir))
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
    if task[0] == "trial":
        _, record, give_up = task
        result: Any = runner.run(record, give_up_above_ms=give_up)
    else:
        _, candidates = task
        result = runner.finals(candidates)
    partial = Path(result_path + ".partial")
    partial.write_bytes(pickle.dumps(result))
    partial.rename(result_path)


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: some runtimes crash in their atexit handlers
