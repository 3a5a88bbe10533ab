"""What a person follows on the driver's console during a long run: how far each trial and the
sweep have got, and an estimate of the time left; Ray's own lines that do not concern them
kept out.

* Rank 0 of each trial prints a line at its first step, then every :data:`EVERY_S` seconds,
  and at its last step (:class:`TrialProgress`)::

      plora u8 s0: step 24/64 (38%), 8m02s elapsed, ~13m left (then the final evaluation)

  Ray forwards it to the driver prefixed with the process, ``(trial_function pid=…)`` for a
  one-worker trial (it trains in its Tune function), else ``(RayTrainWorker pid=…)``.
* The driver prints the sweep's line (:func:`sweep_line`) every 30 s and when a trial ends
  (:func:`sweep_progress`), beside Tune's own trial table::

      sweep unload-20261206-120000: 1 of 4 trials done, 2 running, 1 pending; 14m10s elapsed, ~28m left

  The estimate: the sweep's elapsed time × the work left ÷ the work done, a trial's work
  counted in steps from its last report (checkpoint) and a trial that ended as done.
* Out of the console: TensorBoard's hint (Tune writes no TensorBoard files for a sweep:
  ``sweep/tune.py``, ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS``), and (:func:`driver_console`)
  the raylet's warning that more worker processes started than it expected
  (a Ray Train trial starts several: its Tune actor, Train's controller, its placement-group
  cleaner and its workers); Ray Train's INFO lines (each report's metrics, each checkpoint's path, the
  worker group's start) stay in the session's log files (``ray/trainer.py``: ``LoggingConfig``;
  ``ray/worker.py``: ``quiet_train_reports``).
"""

from __future__ import annotations

import os
import time

EVERY_S = 30.0  # a trial's progress line at most this often (and at its first and last step)
# Ray folds "similar" lines (equal once every word with a digit is dropped) from several
# workers into one "[repeated Nx across cluster]" line, printed seconds later with the last one
# only: every trial's progress line and the training loop's step, eval and unload lines would
# look alike. These are never folded (RAY_DEDUP_LOGS_ALLOW_REGEX).
PROGRESS_LINES = r": step \d+/\d+ \(|^step \d+: loss|^eval at step \d+|^unload \d+ at step|^stage \d+ \(unload"
STARTUP_WARNING = "worker processes have been started on node"  # the raylet's, dropped
DRIVER_LOG_SETTINGS = {"RAY_DEDUP_LOGS_ALLOW_REGEX": PROGRESS_LINES,
                       "RAY_DEDUP_LOGS_SKIP_REGEX": STARTUP_WARNING}


def driver_console() -> None:
    """Set :data:`DRIVER_LOG_SETTINGS` for this process unless the user set them. Ray reads
    them when it is imported (``ray/_private/ray_constants.py``): call this before the
    process's first ``import ray`` (``plora_ray.sweep.tune`` does, at its own import)."""
    for key, value in DRIVER_LOG_SETTINGS.items():
        os.environ.setdefault(key, value)


def duration(seconds: float) -> str:
    """``45s``, ``12m03s``, ``1h02m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class TrialProgress:
    """A trial's progress line, printed by its rank 0: step k of the plan's total, the time
    since its training started in this process, and an estimate of the time left (the mean
    time per step so far, its checkpoints' evaluations included, times the steps left).
    ``final_evaluation``: benchmarks scored only at the end follow the last step."""

    def __init__(self, name: str, total: int, start_step: int = 0, final_evaluation: bool = False,
                 every_s: float = EVERY_S, clock=time.monotonic, write=None):
        self.name, self.total, self.start_step = name, total, start_step
        self.final_evaluation, self.every_s, self.clock = final_evaluation, every_s, clock
        self.write = write or (lambda line: print(line, flush=True))
        self.started = clock()
        self.last = None  # when the last line was printed

    def line(self, step: int) -> str:
        elapsed = self.clock() - self.started
        done = max(1, step - self.start_step)
        then = " (then the final evaluation)" if self.final_evaluation else ""
        if step >= self.total:
            return (f"{self.name}: step {step}/{self.total} (100%), training done in {duration(elapsed)}"
                    + ("; the final evaluation follows" if self.final_evaluation else ""))
        left = elapsed / done * (self.total - step)
        return (f"{self.name}: step {step}/{self.total} ({100 * step // self.total}%), "
                f"{duration(elapsed)} elapsed, ~{duration(left)} left{then}")

    def step(self, step: int) -> None:
        now = self.clock()
        if self.last is None or step >= self.total or now - self.last >= self.every_s:
            self.write(self.line(step))
            self.last = now


def sweep_line(name: str, trials, total: int, elapsed: float, ending=None) -> str:
    """The sweep's progress: trials done (ended, whatever the outcome) of ``total``, running and
    pending, elapsed time and the estimate of the time left. ``trials``: Tune's (status,
    last_result); ``ending``: a trial Tune is ending (still RUNNING when it says so)."""
    done = running = pending = 0
    work = 0.0
    for t in trials:
        status = t.status
        if status in ("TERMINATED", "ERROR") or t is ending:
            done += 1
            work += 1.0
            continue
        running += status == "RUNNING"
        pending += status != "RUNNING"
        result = t.last_result or {}
        if status == "RUNNING" and result.get("total_steps"):
            work += min(1.0, result.get("step", 0) / result["total_steps"])
    total = max(total, len(trials))
    pending += total - len(trials)  # not created yet by the searcher
    if done == total:
        estimate = "done"
    elif work > 0:
        estimate = f"~{duration(elapsed * (total - work) / work)} left"
    else:
        estimate = "an estimate after a trial's first checkpoint"
    counts = ", ".join(f"{n} {what}" for n, what in ((running, "running"), (pending, "pending")) if n)
    return (f"sweep {name}: {done} of {total} trials done{', ' + counts if counts else ''}; "
            f"{duration(elapsed)} elapsed, {estimate}")


def sweep_progress(name: str):
    """A Tune callback that prints the sweep's line (:func:`sweep_line`) when the sweep starts,
    every :data:`EVERY_S` seconds and when a trial ends (Tune's own reporter prints its trial
    table beside it). Pass it in the Tuner's ``RunConfig(callbacks=[...])``."""
    from ray.tune import Callback

    class SweepProgress(Callback):
        def __init__(self):
            self.started, self.total, self.last, self.finished = None, 0, None, False

        def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
            self.started, self.total = time.time(), total_num_samples or 0

        def line(self, trials, ending=None) -> None:
            self.last = time.time()
            text = sweep_line(name, trials, self.total, self.last - (self.started or self.last), ending)
            if not self.finished:  # the last line, "... done", once
                print(text, flush=True)
            self.finished = text.endswith(", done")

        def on_step_end(self, iteration, trials, **info):
            if self.last is None or time.time() - self.last >= EVERY_S:
                self.line(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.line(trials, trial)  # Tune calls this while the trial is still RUNNING

        def on_trial_error(self, iteration, trials, trial, **info):
            self.line(trials, trial)

    return SweepProgress()
