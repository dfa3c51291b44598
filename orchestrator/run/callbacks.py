"""The driver-side Tune callback that turns trial results into the sweep's Parquet tables."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from ray import tune

from orchestrator.run import halt
from orchestrator.run.restore import fall_back
from orchestrator.run.storage import STORAGE_FAILED_KEY
from orchestrator.run.tune_config import trial_params
from orchestrator.store.failures import RETRY_KEY
from orchestrator.store.provenance import record_node
from orchestrator.store.sweep_dir import ERROR_FILE
from orchestrator.store.tables import EVAL_KEYS, ResultsWriter, parameter_columns, parameter_row
from orchestrator.sweepfile.sections import Sweep


def now() -> datetime:
    return datetime.now(timezone.utc)


def error_reason(trial) -> str:
    """The last line of the trial's latest error (Tune keeps every failure's trace in its error.txt)."""
    try:
        lines = (trial.get_error() or "").strip().splitlines()
    except Exception:  # a callback that raises would end the whole sweep; the reason is not worth that
        lines = []
    return lines[-1][:500] if lines else "trial raised an error (see error.txt in its Tune directory)"


class ResultsCallback(tune.Callback):
    """Driver-side Tune callback that turns results into the Parquet tables.

    The writer is built in `setup`, so a restored experiment (whose callbacks Tune
    unpickles) re-reads the tables already on disk instead of a stale copy."""

    def __init__(self, sweep: Sweep, sweep_dir: str, live=None, scheduler=None):
        self.sweep = sweep
        self.sweep_dir = sweep_dir
        self.live = live
        self.scheduler = scheduler  # TrialASHA / ConfigASHA: which trials it stopped, where and why
        self.writer: ResultsWriter | None = None
        self.flags: dict[str, tuple[str, str]] = {}
        self.retried: dict[str, str] = {}  # trial -> why it was moved to a whole GPU
        self.reconciled = 0  # how many of the scheduler's stopped configurations were reconciled
        self.nodes_seen: set[str] = set()  # nodes whose versions this run recorded (provenance)
        self.param_rows: dict[str, tuple[dict, dict]] = {}

    def setup(self, **info):
        self.writer = ResultsWriter(Path(self.sweep_dir), self.sweep.name, parameter_columns(self.sweep.swept_names()))
        self.nodes_seen = set()
        self.param_rows = {}  # trial -> (its parameters, their columns): parameter_row validates a whole config
        self.notes: dict[str, str] = {}  # trial -> how it was resumed (orchestrator.run.restore), once it ends
        self.restored_checked = False
        if self.live is not None:
            self.live.start(self.writer)

    def _params(self, trial) -> dict:
        """The trial's parameter columns, built again only when its parameters change."""
        params = trial_params(trial.config)
        cached = self.param_rows.get(trial.trial_id)
        if cached is None or cached[0] != params:
            cached = self.param_rows[trial.trial_id] = (params, parameter_row(self.sweep, params))
        return cached[1]

    def _ensure(self, trial) -> None:
        if trial.trial_id not in self.writer.trials:
            self.writer.update_trial(
                trial.trial_id,
                **self._params(trial),
                status="pending",
                kimg=0.0,
                evaluations=0,
                kimg_budget=float(self.sweep.train.kimg),
                run_dir=str(Path(self.sweep_dir) / "trials" / trial.trial_id),
            )

    def on_step_begin(self, iteration, trials, **info):
        """Before Tune starts any trial of a resumed run: checkpoints its saved state names but that are gone."""
        if self.restored_checked:
            return
        self.restored_checked = True
        for fell in fall_back(trials):
            self.notes[fell.trial_id] = fell.note()
            if fell.trial_id in self.writer.trials:
                self.writer.update_trial(fell.trial_id, reason=fell.note())

    def on_trial_start(self, iteration, trials, trial, **info):
        self._ensure(trial)
        row = self.writer.trials[trial.trial_id]
        self.writer.update_trial(trial.trial_id, status="running", started=row.get("started") or now())
        self._refresh(trial.trial_id)

    def on_trial_restore(self, iteration, trials, trial, **info):
        self.on_trial_start(iteration, trials, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._ensure(trial)
        if result.get("node_versions") and result.get("node") not in self.nodes_seen:
            self.nodes_seen.add(result.get("node"))
            record_node(Path(self.sweep_dir), result.get("node"), result["node_versions"])
        if result.get("device_used") and not self.writer.trials[trial.trial_id].get("device_used"):
            self.writer.update_trial(trial.trial_id, device_used=result["device_used"])
        if result.get("diverged"):
            self.flags[trial.trial_id] = ("diverged", result.get("reason", ""))
            return
        if result.get(STORAGE_FAILED_KEY):  # not the trial's fault: the sweep stops, resumable once fixed
            self.writer.update_trial(trial.trial_id, reason=result[STORAGE_FAILED_KEY][:1000])
            halt.request(result[STORAGE_FAILED_KEY])
            return
        if result.get(RETRY_KEY):  # not an evaluation: the trial restarts on a whole GPU (WholeGpuAfterOom)
            self.retried[trial.trial_id] = result[RETRY_KEY]
            self.writer.update_trial(
                trial.trial_id, reason=f"{result[RETRY_KEY]} (on a GPU share; retrying on a whole GPU)"
            )
            self._refresh(trial.trial_id)
            return
        if result.get("error"):
            retried = self.retried.get(trial.trial_id)
            reason = f"{result['error']} (on a whole GPU, after: {retried})" if retried else result["error"]
            self.flags[trial.trial_id] = ("error", reason[:1000])
            return
        row = {
            "trial_id": trial.trial_id,
            **self._params(trial),
            **{k: result.get(k) for k in EVAL_KEYS},
            "time": now(),
        }
        self.writer.add_evaluation(row)
        self._summarise(trial)
        self._reconcile()
        self._refresh(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ensure(trial)
        status, reason = self.flags.pop(trial.trial_id, (None, ""))
        if status == "error":
            self._write_error(trial.trial_id, reason)
        stop = self.scheduler.stop_info(trial.trial_id) if hasattr(self.scheduler, "stop_info") else None
        culled = {}
        if status is None and stop is not None:
            # Stopped by ASHA (with unit config: because its configuration's mean was cut at that rung,
            # so every seed of it ends here, whatever kimg this one had reached).
            status = "stopped_early"
            culled = {"stopped_at_kimg": float(stop[0]), "stopped_metric": float(stop[1])}
        elif status is None:
            reached = self.writer.trials[trial.trial_id].get("kimg") or 0.0
            status = "completed" if reached >= self.sweep.train.kimg - 1e-9 else "stopped_early"
        if not reason and trial.trial_id in self.retried:  # shown, not hidden: it needed a GPU of its own
            reason = f"finished on a whole GPU after: {self.retried[trial.trial_id]}"[:1000]
        reason = reason or self.notes.get(trial.trial_id, "")
        self._summarise(trial, status=status, reason=reason, ended=now(), **culled)
        self._reconcile()
        self._refresh(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ensure(trial)
        try:
            text = trial.get_error() or ""
        except Exception:  # a callback that raises would end the whole sweep
            text = ""
        self._write_error(trial.trial_id, text or error_reason(trial))
        self._summarise(trial, status="error", reason=error_reason(trial), ended=now())
        self._refresh(trial.trial_id)

    def _write_error(self, trial_id: str, text: str) -> None:
        """The whole reason (Tune's traceback) goes to trials/<id>/error.txt; the table keeps its last line."""
        path = Path(self.sweep_dir) / "trials" / trial_id / ERROR_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text.rstrip() + "\n")
        except OSError:
            pass  # the reason is still in trials.parquet

    def get_state(self) -> None:
        """Tune calls this just before it saves the experiment state that --resume restores: every row and
        scheduler decision so far is made durable first, so none that Tune will not re-deliver is lost. Returns
        None: the callback keeps no state of its own in Tune's checkpoint."""
        if self.writer is not None:
            self.writer.flush()
        if hasattr(self.scheduler, "flush_state"):
            self.scheduler.flush_state()
        return None

    def on_experiment_end(self, trials, **info):
        if self.live is not None:
            self.live.stop()
        if self.writer is not None:
            self.writer.flush()
            self.writer.sync()  # merges and fsyncs still on the sync thread end with the experiment
        if hasattr(self.scheduler, "snapshot"):
            self.scheduler.snapshot()  # the sweep's end: the journal becomes scheduler.json

    def _reconcile(self) -> None:
        """A seed that finished its budget before its configuration was culled (ConfigASHA lets seeds that are
        ahead keep training) ends like its siblings: stopped_early at the rung where the configuration was.
        Only configurations stopped since the last call are looked at: the cost does not grow with the sweep."""
        if not hasattr(self.scheduler, "stopped_configs"):
            return
        stopped = self.scheduler.stopped_configs()
        for config in stopped[self.reconciled:]:
            rung, metric = self.scheduler.stopped[config]
            for trial_id in self.scheduler.members.get(config, []):
                row = self.writer.trials.get(trial_id)
                if row is not None and row.get("status") == "completed" and row.get("stopped_at_kimg") is None:
                    self.writer.update_trial(trial_id, status="stopped_early", stopped_at_kimg=float(rung),
                                             stopped_metric=float(metric))
        self.reconciled = len(stopped)

    def _summarise(self, trial, **fields) -> None:
        summary = self.writer.summary(trial.trial_id)
        last = summary.pop("last")
        if last is not None:
            summary.update(
                final_fid=last["fid"] if last.get("final") else None,
                final_is=last.get("is_mean") if last.get("final") else None,
                final_fid_samples=last.get("fid_samples") if last.get("final") else None,
                extractor=last.get("extractor"),
                kimg=last["kimg"],
                g_steps=last.get("g_steps"),
                grid_path=last.get("grid_path"),
                node=last.get("node"),
                data_source=last.get("data_source"),
                device_used=last.get("device_used"),
            )
        if trial.checkpoint is not None:
            summary["checkpoint_path"] = trial.checkpoint.path
        self.writer.update_trial(trial.trial_id, **summary, **fields)

    def _refresh(self, trial_id: str | None = None) -> None:
        if self.live is not None:
            self.live.refresh(trial_id)
