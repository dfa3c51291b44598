"""On --resume: a trial whose saved state names a checkpoint that no longer exists falls back to its newest
existing one.

Ray Tune 2.60 registers a trial's new checkpoint, deletes the ones past `num_to_keep` (with 1: the previous
one) and only then saves the experiment state that --resume restores. A driver killed in between leaves a
state naming a deleted checkpoint; Tune would then fail the trial on every restore ("Could not recover from
checkpoint as it does not exist on storage anymore") and, when it next saves, crash deleting it again. Before
Tune starts any restored trial (the first step of the resumed run), `fall_back` points each such trial at the
newest complete `checkpoint_NNNNNN` in its Tune directory (or at none: it then restarts from scratch), and
moves Tune's checkpoint index past it so that the next checkpoint never lands on the one restored from.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pyarrow.fs import FileSelector, FileType
from ray.train._internal.session import _TrainingResult
from ray.tune import Checkpoint
from ray.tune.experiment import Trial

from gan.training import CHECKPOINT_FILE

CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")


@dataclass(frozen=True)
class FallBack:
    trial_id: str
    missing: str  # the checkpoint the saved state named
    used: str | None  # the one the trial resumes from; None: it restarts from scratch

    def note(self) -> str:
        named = self.missing.rstrip("/").rsplit("/", 1)[-1]
        if self.used is None:
            return f"restarted from scratch: its saved state named {named}, which no longer exists, and it had no other"
        used = self.used.rstrip("/").rsplit("/", 1)[-1]
        return f"resumed from {used}: its saved state named {named}, which no longer exists"


def complete(fs, path: str) -> bool:
    """A checkpoint directory holding the training loop's checkpoint file, not empty (copied whole)."""
    info = fs.get_file_info(f"{path}/{CHECKPOINT_FILE}")
    return info.type == FileType.File and (info.size or 0) > 0


def newest_checkpoint(fs, trial_path: str) -> tuple[int, str] | None:
    """(index, path) of the newest complete checkpoint_NNNNNN directory of a trial, or None."""
    found = []
    for info in fs.get_file_info(FileSelector(trial_path, allow_not_found=True, recursive=False)):
        match = CHECKPOINT_DIR.match(info.base_name)
        if info.type == FileType.Directory and match:
            found.append((int(match.group(1)), info.path))
    for index, path in sorted(found, reverse=True):
        if complete(fs, path):
            return index, path
    return None


def fall_back(trials: list[Trial]) -> list[FallBack]:
    """Point every unfinished trial whose latest checkpoint is gone at its newest existing one."""
    done = []
    for trial in trials:
        manager = trial.run_metadata.checkpoint_manager
        latest = manager.latest_checkpoint_result if manager is not None else None
        if trial.status == Trial.TERMINATED or latest is None or latest.checkpoint is None:
            continue
        fs, path = latest.checkpoint.filesystem, latest.checkpoint.path
        if complete(fs, path):
            continue
        newest = newest_checkpoint(fs, trial.storage.trial_fs_path)
        if newest is None:
            manager._checkpoint_results = []
            manager._latest_checkpoint_result = None
        else:
            index, used = newest
            result = _TrainingResult(checkpoint=Checkpoint(used, filesystem=fs), metrics=dict(latest.metrics))
            # The others that are gone would be deleted again when Tune next registers a checkpoint: a crash.
            manager._checkpoint_results = [r for r in manager._checkpoint_results
                                           if r.checkpoint is not None and r.checkpoint.path != path
                                           and complete(fs, r.checkpoint.path) and r.checkpoint.path != used]
            manager._checkpoint_results.append(result)
            manager._latest_checkpoint_result = result
            trial.storage.current_checkpoint_index = max(trial.storage.current_checkpoint_index, index)
        trial.invalidate_json_state()
        trial.run_metadata.invalidate_cache()
        done.append(FallBack(trial.trial_id, path, newest[1] if newest else None))
    return done
