"""SLURM through Hydra's submitit launcher (`hydra/launcher=slurm` and `slurm_cpu`): what the
submitting side needs beyond the plugin. Both launcher configs add `SlurmChecks`, a Hydra
callback that, before anything is submitted,

- checks the request against the trainer in one line (a CPU trainer on GPU nodes, GPUs
  asked for by a CPU launcher, a device count SLURM cannot start tasks for): such a job
  would wait in the queue forever or be refused by `sbatch` with a traceback;
- makes the launcher notice jobs that end without a result on clusters without
  accounting. submitit learns that a job ended from its result file, else from `sacct`;
  a job stopped without one (`scancel`, a node failure, a time limit without requeue) was
  seen only through `sacct`, which fails where accounting is off
  (`AccountingStorageType=accounting_storage/none`, common on small clusters), so the
  launcher polled forever. `QueueWatcher` asks `squeue` whenever `sacct` cannot answer.

A job that ends without a result (`scancel`, a node failure, a time limit without requeue)
made submitit's `Job.results` raise in the launching process, which ended the sweep command
with submitit's traceback while the other jobs still ran: `record_jobs_without_result`
makes it one row of the sweep's summary (`cvae.summary`) and lets the sweep go on.

What happens inside a job (time limit, requeue, resume) is in `checkpointing.SaveOnInterrupt`
and `training.build`.
"""

from __future__ import annotations

import getpass
import logging
import re
import subprocess
import sys
import time
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from submitit.core.core import Job
from submitit.core.utils import UncompletedJobError
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

log = logging.getLogger(__name__)

# squeue states after which a job never runs again; others mean it is still in the queue.
FINAL = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "TIMEOUT",
}
# What submitit's `is_done` reads as "not finished" (submitit.core.core.InfoWatcher).
UNFINISHED = {"READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING", "PREEMPTED"}
LEFT_QUEUE = "LEFT_QUEUE"  # no longer known to squeue (ended longer than MinJobAge ago)


class QueueWatcher(SlurmInfoWatcher):
    """submitit's job watcher (one per process, shared by all jobs), asking `squeue` for the
    states of this user's jobs whenever `sacct` fails. Same polling schedule as submitit's."""

    def __init__(self, delay_s: int = 600) -> None:
        super().__init__(delay_s=delay_s)
        self.accounting = True  # until sacct says otherwise

    def update(self) -> None:
        command = self._make_command()
        if command is None:
            return
        self._num_calls += 1
        info = self._sacct(command) if self.accounting else None
        if info is None:
            info = self._squeue()
        if info is not None:
            self._info_dict.update(info)
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def _sacct(self, command: list[str]) -> dict[str, dict[str, str]] | None:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as error:
            log.warning("sacct failed (%s): asking squeue", error)
            return None
        if done.returncode != 0:
            if "accounting storage is disabled" in done.stderr:
                self.accounting = False
                log.warning(
                    "SLURM accounting is disabled here (sacct: %s): following the jobs with squeue",
                    done.stderr.strip(),
                )
            else:
                log.warning("sacct failed (%s): asking squeue", done.stderr.strip())
            return None
        self._output = done.stdout.encode()
        return self.read_info(done.stdout)

    def _squeue(self) -> dict[str, dict[str, str]] | None:
        """The registered jobs' states as squeue lists them (all states, this user's jobs);
        a job it no longer lists has left the queue."""
        command = [
            "squeue",
            "--noheader",
            "--states=all",
            f"--user={getpass.getuser()}",
            "--format=%i|%T|%N",
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
        except (OSError, subprocess.SubprocessError) as error:
            log.warning("squeue failed too (%s): job states may be stale", error)
            return None
        info = self.read_info("JobID|State|NodeList\n" + done.stdout)
        for stats in info.values():  # submitit's words: anything not final is still running
            if stats["State"] not in FINAL | UNFINISHED:
                stats["State"] = "RUNNING"
        for job_id in self._registered - self._finished - set(info):
            info[job_id] = {"JobID": job_id, "State": LEFT_QUEUE, "NodeList": ""}
        return info


def _value(node: DictConfig, key: str) -> Any:
    """A config value, or its unresolved text where it does not resolve to a valid value."""
    try:
        return node[key]
    except Exception:
        return OmegaConf.to_container(node, resolve=False)[key]


class SlurmChecks(Callback):
    """Hydra callback of the SLURM launcher configs: the request checked against the
    trainer before anything is submitted, and `QueueWatcher` installed for the jobs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_request(config)
        except ValueError as error:  # one line, before any job is submitted
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        if not isinstance(SlurmJob.watcher, QueueWatcher):  # a class attribute, shared by jobs
            SlurmJob.watcher = QueueWatcher(delay_s=SlurmJob.watcher._delay_s)


def check_request(config: DictConfig) -> None:
    """A one-line `ValueError` for a launcher request SLURM cannot give the trainer."""
    launcher, trainer = config.hydra.launcher, config.get("trainer") or {}
    devices, accelerator = trainer.get("devices"), trainer.get("accelerator")
    for key in ("nodes", "tasks_per_node"):
        value = _value(launcher, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"hydra.launcher.{key}={value}: SLURM needs a number >= 1 (tasks_per_node is "
                f"trainer.devices, one task per device: give it as a number, e.g. "
                f"trainer.devices=4; it is {devices})"
            )
    gpus = _value(launcher, "gpus_per_node")
    if accelerator == "cpu" and gpus:
        raise ValueError(
            f"trainer.accelerator=cpu, but hydra.launcher.gpus_per_node={gpus}: use "
            "hydra/launcher=slurm_cpu for CPU nodes (or hydra.launcher.gpus_per_node=null)"
        )
    if accelerator in ("gpu", "cuda") and not gpus:
        raise ValueError(
            f"trainer.accelerator={accelerator}, but hydra.launcher.gpus_per_node={gpus}: the "
            "job would get no GPU; use hydra/launcher=slurm (one GPU per task)"
        )


def record_jobs_without_result(sweeper_stops_at_failures: bool) -> None:
    """In the launching process of a submitit sweep: a job that ends without a result
    returns a failed job (the sweeper goes on, and the job's own folder says what stopped it:
    `job.json`, its log) instead of raising submitit's `UncompletedJobError`. For a sweeper
    that ends at the first failure (Hydra's basic one), a completed job with no value."""
    if getattr(Job.results, "records_missing_results", False):
        return
    results = Job.results

    def results_or_record(job: Job) -> list:
        try:
            return results(job)
        except UncompletedJobError as error:
            state = re.search(r"\(state: ([^)]*)\)", str(error))
            reason = f" (state {state.group(1)})" if state else ""
            log.warning("job %s ended without a result%s", job.job_id, reason)
            missing = JobReturn(status=JobStatus.FAILED, _return_value=error)
            if sweeper_stops_at_failures:
                missing = JobReturn(status=JobStatus.COMPLETED, _return_value=None)
            return [missing]

    results_or_record.records_missing_results = True  # type: ignore[attr-defined]
    Job.results = results_or_record  # type: ignore[method-assign]
