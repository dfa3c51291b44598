"""The results store: column types from the sweep schema, part files merged by key, idempotent compaction,
failed writes retried, the format marker, provenance."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.store import parts as parts_module
from orchestrator.store.part_rows import ROWS_MAGIC
from orchestrator.store.parts import MERGE_FANOUT, PARTS_DIR, part_files, read_parts
from orchestrator.store.provenance import PROVENANCE_FILE, changes, read_provenance, record_provenance
from orchestrator.store.reader import ResultsError, load_evaluations, load_trials
from orchestrator.store.tables import (
    EVALUATIONS_FILE,
    FORMAT_FILE,
    FORMAT_VERSION,
    TRIALS_FILE,
    ResultsWriter,
    compact,
    read_rows,
    read_table,
)

PARAMS = ["amp", "beta1", "g_widths", "heads", "lr_d", "seed", "variant"]
# Written out by hand from gan.config's field types: the independent reference.
EXPECTED = {"amp": pa.bool_(), "beta1": pa.float64(), "g_widths": pa.string(), "heads": pa.int64(),
            "lr_d": pa.float64(), "seed": pa.int64(), "variant": pa.string()}


def parameter_schema(table: pa.Table) -> dict[str, pa.DataType]:
    return {name: table.schema.field(name).type for name in PARAMS}


def test_conditional_column_keeps_its_type_from_the_first_snapshot_to_the_last(tmp_path):
    writer = ResultsWriter(tmp_path, "s", PARAMS, flush_rows=1)
    # Early snapshot: only a trial where the conditional `heads` does not apply, and beta1 unset.
    writer.update_trial("t0", amp=True, beta1=None, g_widths="64-32", heads=None, lr_d=1e-4, seed=0, variant="dcgan")
    writer.add_evaluation({"trial_id": "t0", "amp": True, "beta1": None, "g_widths": "64-32", "heads": None,
                           "lr_d": 1e-4, "seed": 0, "variant": "dcgan", "kimg": 1.0, "fid": 10.0})
    early = (parameter_schema(read_table(tmp_path, "trials")), parameter_schema(read_table(tmp_path, "evaluations")))
    writer.update_trial("t1", amp=False, beta1=0.5, g_widths="64-32", heads=4, lr_d=2e-4, seed=1, variant="cmhsa-gan")
    writer.close()
    late = (parameter_schema(pq.read_table(tmp_path / TRIALS_FILE)),
            parameter_schema(pq.read_table(tmp_path / EVALUATIONS_FILE)))
    assert early == late == (EXPECTED, EXPECTED)
    assert pq.read_table(tmp_path / TRIALS_FILE).column("heads").to_pylist() == [None, 4]


def test_two_sweeps_with_the_same_parameters_write_the_same_types(tmp_path):
    # One sweep's lr_d values happen to be whole numbers in YAML; the other's are not.
    for name, lr_d in (("a", 1), ("b", 1.5e-4)):
        writer = ResultsWriter(tmp_path / name, name, PARAMS)
        writer.update_trial("t0", amp=True, beta1=None, g_widths="8", heads=None, lr_d=lr_d, seed=0, variant="dcgan")
        writer.close()
    a, b = (pq.read_table(tmp_path / name / TRIALS_FILE) for name in "ab")
    assert parameter_schema(a) == parameter_schema(b) == EXPECTED


def test_a_value_that_does_not_fit_the_schema_type_is_refused_not_truncated(tmp_path):
    writer = ResultsWriter(tmp_path, "s", ["heads"], flush_rows=1)
    with pytest.raises(pa.ArrowInvalid):
        writer.update_trial("t0", heads=2.5)


# ---- parts, merged reads, compaction ------------------------------------------------------------------


def evaluation(trial: str, kimg: float, fid: float, seed: int = 0) -> dict:
    return {"trial_id": trial, "seed": seed, "kimg": kimg, "fid": fid, "is_mean": 1.0 + fid / 100}


def test_rows_go_to_part_files_and_readers_see_parts_and_compacted_rows_as_one_table(tmp_path):
    writer = ResultsWriter(tmp_path, "s", ["seed"], flush_rows=2)
    writer.update_trial("t0", seed=0, status="running")
    writer.add_evaluation(evaluation("t0", 1.0, 50.0))
    writer.add_evaluation(evaluation("t0", 2.0, 40.0))
    writer.close()  # compacted
    assert (tmp_path / EVALUATIONS_FILE).exists() and not (tmp_path / PARTS_DIR).exists()
    assert (tmp_path / FORMAT_FILE).read_text().strip() == str(FORMAT_VERSION)

    writer = ResultsWriter(tmp_path, "s", ["seed"], flush_rows=1)  # --resume: a new session on top
    writer.add_evaluation(evaluation("t0", 2.0, 38.0))  # re-reported after a restart: replaces the row
    writer.add_evaluation(evaluation("t0", 3.0, 30.0))
    writer.update_trial("t0", status="completed", kimg=3.0, evaluations=3)
    writer.update_trial("pending-0001", seed=1, status="pending")
    writer.drop_trials(["pending-0001"])  # a placeholder Tune adds under its real id
    assert part_files(tmp_path, "evaluations") and part_files(tmp_path, "trials")
    # A reader during the run: compacted rows and parts, the latest row of each key, deleted rows gone.
    evals = load_evaluations(tmp_path)
    assert list(zip(evals["kimg"], evals["fid"], strict=True)) == [(1.0, 50.0), (2.0, 38.0), (3.0, 30.0)]
    trials = load_trials(tmp_path)
    assert list(trials["trial_id"]) == ["t0"] and trials["status"].iloc[0] == "completed"
    assert [c for c in evals.columns if c.startswith("_")] == []
    assert writer.summary("t0")["best_fid"] == 30.0 and writer.summary("t0")["evaluations"] == 3


def test_compaction_is_idempotent_and_survives_a_crash_before_parts_are_deleted(tmp_path, monkeypatch):
    writer = ResultsWriter(tmp_path, "s", ["seed"], flush_rows=1)
    for k in range(5):
        writer.add_evaluation(evaluation("t0", float(k + 1), 50.0 - k))
        writer.update_trial("t0", seed=0, status="running", kimg=float(k + 1))
    writer.flush()
    expected = (read_rows(tmp_path, "evaluations"), read_rows(tmp_path, "trials"))
    # Crash after the compacted tables are written, before the parts are deleted.
    monkeypatch.setattr(parts_module.Path, "unlink", lambda self, missing_ok=False: None)
    compact(tmp_path)
    monkeypatch.undo()
    assert part_files(tmp_path, "evaluations")  # left behind ...
    assert (read_rows(tmp_path, "evaluations"), read_rows(tmp_path, "trials")) == expected  # ... and harmless
    compact(tmp_path)
    compact(tmp_path)
    assert not (tmp_path / PARTS_DIR).exists()
    assert (pq.read_table(tmp_path / EVALUATIONS_FILE).to_pylist(), pq.read_table(tmp_path / TRIALS_FILE).to_pylist()) \
        == expected


def test_parts_merge_into_levels_so_their_number_stays_small(tmp_path):
    writer = ResultsWriter(tmp_path, "s", ["seed"], flush_rows=1, part_rows=1)
    n = MERGE_FANOUT * MERGE_FANOUT + 3
    for k in range(n):
        writer.add_evaluation(evaluation(f"t{k % 7}", float(k), float(k)))
    assert len(read_rows(tmp_path, "evaluations")) == n  # also while merges wait for their fsync
    writer.sync()  # merged parts are renamed into place, and their sources deleted, on the sync thread
    files = part_files(tmp_path, "evaluations")
    assert len(files) < 2 * MERGE_FANOUT
    assert len(read_rows(tmp_path, "evaluations")) == n


def test_a_failing_write_is_kept_retried_and_reported_once(tmp_path, monkeypatch, capsys):
    """The disk fills up in the middle of a flush's line: readers never see the cut line, the part it was
    appended to is never appended to again, and the rows are written at the next flush."""
    writer = ResultsWriter(tmp_path, "s", ["seed"], flush_rows=1)
    writer.update_trial("t1", seed=0, status="running")
    write_all = parts_module._write_all
    failures = {"left": 2}

    def disk_full(fd, data):
        if failures["left"]:
            failures["left"] -= 1
            write_all(fd, bytes(data)[:len(data) // 2])  # half the line made it to the file
            raise OSError(28, "No space left on device")
        write_all(fd, data)

    monkeypatch.setattr(parts_module, "_write_all", disk_full)
    writer.update_trial("t1", status="completed")  # fails: kept
    writer.add_evaluation(evaluation("t1", 1.0, 20.0))  # fails again (a new part's header and line): one warning
    assert read_rows(tmp_path, "trials")[0]["status"] == "running"  # the cut line is not read
    assert read_rows(tmp_path, "evaluations") == []
    writer.flush()  # the disk has room again
    assert read_rows(tmp_path, "trials")[0]["status"] == "completed"
    assert [r["fid"] for r in read_rows(tmp_path, "evaluations")] == [20.0]
    err = capsys.readouterr().err
    assert err.count("cannot write") == 1 and err.count("written again") == 1
    assert len(part_files(tmp_path, "trials")) == 2  # the cut part was closed; the retry opened another
    writer.close()
    assert [r["status"] for r in read_rows(tmp_path, "trials")] == ["completed"]
    assert not (tmp_path / PARTS_DIR).exists()


def test_a_flush_appends_a_line_to_the_open_part_until_it_holds_part_rows(tmp_path):
    writer = ResultsWriter(tmp_path, "s", ["seed"], flush_rows=1, part_rows=3)
    for k in range(4):
        writer.add_evaluation(evaluation("t0", float(k), 50.0 - k))
    first, second = part_files(tmp_path, "evaluations")
    assert first.read_bytes().count(b"\n") == 2 + 3 and second.read_bytes().count(b"\n") == 2 + 1  # header: 2
    assert [r["kimg"] for r in read_rows(tmp_path, "evaluations")] == [0.0, 1.0, 2.0, 3.0]


def test_a_line_cut_short_by_a_killed_writer_is_left_out_and_the_next_session_writes_a_part_of_its_own(tmp_path):
    writer = ResultsWriter(tmp_path, "s", ["seed"], flush_rows=1)
    for k in range(3):
        writer.add_evaluation(evaluation("t0", float(k), 50.0 - k))
    [part] = part_files(tmp_path, "evaluations")
    with open(part, "ab") as f:  # the machine went down in the middle of the next line
        f.write(b'[{"sweep":"s","trial_id":"t0","kimg":3.0,"fi')
    before = part.read_bytes()
    assert [r["kimg"] for r in read_rows(tmp_path, "evaluations")] == [0.0, 1.0, 2.0]
    writer = ResultsWriter(tmp_path, "s", ["seed"], flush_rows=1)  # --resume
    writer.add_evaluation(evaluation("t0", 3.0, 47.0))
    assert part.read_bytes() == before and len(part_files(tmp_path, "evaluations")) == 2
    assert [r["fid"] for r in read_rows(tmp_path, "evaluations")] == [50.0, 49.0, 48.0, 47.0]
    writer.close()
    assert [r["fid"] for r in read_rows(tmp_path, "evaluations")] == [50.0, 49.0, 48.0, 47.0]


def test_a_newer_results_format_is_refused_in_one_line(tmp_path):
    ResultsWriter(tmp_path, "s", ["seed"]).close()
    (tmp_path / FORMAT_FILE).write_text(f"{FORMAT_VERSION + 1}\n")
    with pytest.raises(ResultsError, match=f"format {FORMAT_VERSION + 1}; this version of gan-sweeps reads format "
                                           f"{FORMAT_VERSION} and older"):
        load_evaluations(tmp_path)


def test_a_table_written_before_part_files_existed_reads_as_it_is(tmp_path):
    pq.write_table(pa.table({"sweep": ["s"], "trial_id": ["t0"], "seed": [0], "kimg": [1.0], "fid": [9.0]}),
                   tmp_path / EVALUATIONS_FILE)
    assert load_evaluations(tmp_path)["fid"].tolist() == [9.0]


# ---- provenance -------------------------------------------------------------------------------------------


class _Sweep:
    parameters: dict = {}  # effective_config records each parameter's spec; this stub sweeps none

    def __init__(self, kimg):
        self.kimg = kimg

    def model_dump(self, mode):
        return {"train": {"kimg": self.kimg}}


class _Data:
    source, key = "synthetic", "abc"


def test_provenance_is_recorded_per_run_and_a_changed_resume_warns(tmp_path, monkeypatch):
    assert record_provenance(_Sweep(4), tmp_path, _Data(), resume=False) == []
    runs = read_provenance(tmp_path)
    assert runs[0]["event"] == "run" and runs[0]["data"] == {"source": "synthetic", "fingerprint": "abc"}
    assert {"python", "torch", "ray", "torch_fidelity", "driver"} <= set(runs[0]["environment"])
    assert runs[0]["project"]["version"] is not None
    assert record_provenance(_Sweep(4), tmp_path, _Data(), resume=True) == []  # nothing changed

    monkeypatch.setattr("orchestrator.store.provenance.project",
                        lambda: {"version": "9.9", "git_commit": "f00", "git_dirty": False})
    lines = record_provenance(_Sweep(8), tmp_path, _Data(), resume=True)
    assert len(lines) == 2 and "other code" in lines[0] and "version" in lines[0] and "configuration" in lines[1]
    assert len([json.loads(x) for x in (tmp_path / PROVENANCE_FILE).read_text().splitlines()]) == 3  # both kept
    changed = changes({"data": {"fingerprint": "a"}}, {"data": {"fingerprint": "b"}})
    assert changed[0].startswith("--resume on other data")


def test_results_command_exports_a_running_sweeps_tables(tmp_path):
    import csv

    from typer.testing import CliRunner

    from orchestrator.cli import app

    sweep_dir = tmp_path / "results" / "s"
    writer = ResultsWriter(sweep_dir, "s", ["seed"], flush_rows=1)  # still "running": parts, no compaction
    (sweep_dir / "fingerprint").write_text("x\n")
    writer.update_trial("t0", seed=0, status="running")
    writer.add_evaluation(evaluation("t0", 1.0, 50.0))
    writer.add_evaluation(evaluation("t0", 1.0, 45.0))  # re-reported: one row
    runner = CliRunner()
    out = tmp_path / "evals.csv"
    result = runner.invoke(app, ["results", "--results", str(tmp_path / "results"), "--table", "evaluations",
                                 "--format", "csv", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert [(r["trial_id"], float(r["fid"])) for r in rows] == [("t0", 45.0)]
    result = runner.invoke(app, ["results", "--results", str(tmp_path / "results"), "--table", "trials",
                                 "--out", str(tmp_path / "trials.parquet")])
    assert result.exit_code == 0 and pq.read_table(tmp_path / "trials.parquet").column("status").to_pylist() == [
        "running"]
    assert part_files(sweep_dir, "evaluations")  # reading compacted nothing: the sweep's own files untouched
    bad = runner.invoke(app, ["results", "--results", str(tmp_path / "nope"), "--table", "trials", "--out", "x"])
    assert bad.exit_code == 2 and "no results directory" in bad.output


def test_parts_are_fsynced_together_at_most_every_second(tmp_path, monkeypatch):
    """Group commit: a flush's line is in the part at once, and the parts written to are fsynced at the next
    sync (a part appended to several times, once)."""
    now = {"t": 0.0}
    health = parts_module.WriteHealth(clock=lambda: now["t"])
    synced = []
    monkeypatch.setattr(parts_module, "fsync_file", lambda path: synced.append(path.name))
    codec = parts_module.RowCodec(pa.schema([("trial_id", pa.string()), ("_seq", pa.int64())]))
    log = parts_module.PartLog(tmp_path, "trials", codec, 0, flush_rows=1, part_rows=2, health=health)
    log.append({"trial_id": "a"})
    log.append({"trial_id": "b"})
    log.append({"trial_id": "c"})
    assert len(part_files(tmp_path, "trials")) == 2 and synced == []  # visible, not yet fsynced
    assert parts_module.read_parts(part_files(tmp_path, "trials")).column("trial_id").to_pylist() == ["a", "b", "c"]
    now["t"] = parts_module.SYNC_EVERY_S
    log.append({"trial_id": "d"})
    health.wait_synced()  # the batch went to the sync thread, each part once
    assert synced == [p.name for p in part_files(tmp_path, "trials")]


def test_a_part_holds_the_values_to_table_makes(tmp_path):
    """Parts are built in one conversion, not column by column: the same types and values as to_table."""
    from datetime import datetime, timezone

    from orchestrator.store.tables import EVALUATION_COLUMNS, TRIAL_COLUMNS, _PartTable, parameter_types, to_table

    params = parameter_types(PARAMS)
    when = datetime(2026, 12, 3, 12, 0, 0, 123456, tzinfo=timezone.utc)
    rows = [
        {"sweep": "s", "trial_id": "t0", "amp": 1, "beta1": 1, "g_widths": 64, "heads": 4.0, "lr_d": 1e-4, "seed": True,
         "variant": "dcgan", "kimg": float("nan"), "fid": float("inf"), "is_mean": True, "extractor": "tiny-conv",
         "fid_samples": 64, "final": False, "time": when, "best_fid": 3, "status": "running", "started": when,
         "_seq": 7, "unknown": object()},
        {"sweep": "s", "trial_id": "t1", "_seq": 8, "_deleted": True},
    ]
    for fixed in (EVALUATION_COLUMNS, TRIAL_COLUMNS):
        expected = to_table(rows, fixed, params)
        expected = expected.append_column("_seq", pa.array([7, 8], type=pa.int64()))
        expected = expected.append_column("_deleted", pa.array([False, True]))
        assert pa.Table.from_batches([_PartTable(fixed, params)(rows)]).equals(expected)
    with pytest.raises(pa.ArrowInvalid):  # the checked cast of to_table
        _PartTable(EVALUATION_COLUMNS, params)([{"trial_id": "t0", "heads": 2.5}])


def test_a_flushed_part_reads_back_as_the_arrow_rows_it_was_built_from(tmp_path):
    """A flushed part holds JSON rows: read back, they are the record batch the rows build, type for type
    (timestamps, nulls, non-finite numbers made null, labels, the checked cast), beside merged Arrow parts."""
    from datetime import datetime, timezone

    import numpy as np

    from orchestrator.store.tables import EVALUATION_COLUMNS, TRIAL_COLUMNS, _PartTable, parameter_types

    params = parameter_types(PARAMS)
    when = datetime(2026, 12, 3, 12, 0, 0, 123456, tzinfo=timezone.utc)
    rows = [
        {"sweep": "s", "trial_id": "t0", "amp": 1, "beta1": 1, "g_widths": 64, "heads": 4.0, "lr_d": 1e-4, "seed": True,
         "variant": "dcgan", "kimg": 0.1 + 0.2, "fid": float("inf"), "is_mean": np.float32(2.5), "extractor": "tiny",
         "fid_samples": np.int64(64), "final": False, "time": when, "best_fid": 3, "status": "running",
         "started": when, "_seq": 7, "unknown": object(), "reason": "quote \" and \u00e9 and \n"},
        {"sweep": "s", "trial_id": "t1", "_seq": 8, "_deleted": True},
    ]
    for n, fixed in enumerate((EVALUATION_COLUMNS, TRIAL_COLUMNS)):
        table = _PartTable(fixed, params)
        codec = table.codec()
        path = tmp_path / f"t{n}.0.000000000007.part"
        path.write_bytes(codec.header + codec.encode(codec.fit(rows)))
        assert path.read_bytes().startswith(ROWS_MAGIC)
        expected = pa.Table.from_batches([table(rows)])
        assert read_parts([path]).equals(expected)
        ipc = tmp_path / f"t{n}.1.000000000007.part"  # a merged part: Arrow IPC, read beside a JSON one
        parts_module.write_atomic(expected, ipc, arrow=True)
        assert read_parts([path, ipc]).equals(pa.concat_tables([expected, expected]))


def test_updates_between_flushes_write_one_row_per_key(tmp_path):
    writer = ResultsWriter(tmp_path, "s", ["seed"])
    writer.update_trial("t0", seed=0, status="pending")
    writer.update_trial("t0", status="running")
    writer.add_evaluation(evaluation("t0", 1.0, 50.0))
    writer.add_evaluation(evaluation("t0", 1.0000001, 45.0))  # the same kimg, re-reported
    writer.update_trial("t0", kimg=1.0, best_fid=45.0)
    writer.flush()
    [trials], [evals] = part_files(tmp_path, "trials"), part_files(tmp_path, "evaluations")
    assert read_parts([trials]).num_rows == 1 and read_parts([evals]).num_rows == 1
    [row] = read_rows(tmp_path, "trials")
    assert (row["seed"], row["status"], row["kimg"], row["best_fid"]) == (0, "running", 1.0, 45.0)
    assert [r["fid"] for r in read_rows(tmp_path, "evaluations")] == [45.0]


def test_merges_include_the_parts_a_killed_session_left(tmp_path):
    writer = ResultsWriter(tmp_path, "s", ["seed"], flush_rows=1, part_rows=1)
    for k in range(5):
        writer.add_evaluation(evaluation("t0", float(k), 50.0 - k))
    # The driver is killed: no compaction. The next session merges those parts with its own.
    writer = ResultsWriter(tmp_path, "s", ["seed"], flush_rows=1, part_rows=1)
    for k in range(5, 5 + MERGE_FANOUT):
        writer.add_evaluation(evaluation("t1", float(k), 50.0 - k))
    writer.sync()
    files = part_files(tmp_path, "evaluations")
    assert len(files) < MERGE_FANOUT and any(".1." in p.name for p in files)
    assert len(read_rows(tmp_path, "evaluations")) == 5 + MERGE_FANOUT
    writer.close()
    assert len(pq.read_table(tmp_path / EVALUATIONS_FILE)) == 5 + MERGE_FANOUT


def test_the_callback_flushes_every_row_in_get_state(tmp_path):
    """Tune saves its experiment state right after get_state: no row it will not deliver again stays in memory."""
    from pathlib import Path
    from types import SimpleNamespace

    from orchestrator.run.callbacks import ResultsCallback
    from orchestrator.sweepfile.loading import load_sweep

    sweep = load_sweep(Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml")
    callback = ResultsCallback(sweep, str(tmp_path))
    callback.setup()
    trial = SimpleNamespace(trial_id="t0", config={"params": {"variant": "dcgan", "seed": 1}}, checkpoint=None)
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(1, [], trial, {"kimg": 0.25, "fid": 40.0, "extractor": "tiny-conv"})
    assert read_rows(tmp_path, "evaluations") == []  # buffered (256 rows or 5 s) ...
    assert callback.get_state() is None
    [evaluation_row] = read_rows(tmp_path, "evaluations")  # ... until Tune saves its state
    assert (evaluation_row["fid"], evaluation_row["seed"], evaluation_row["variant"]) == (40.0, 1, "dcgan")
    [trial_row] = read_rows(tmp_path, "trials")
    assert (trial_row["status"], trial_row["evaluations"], trial_row["best_fid"]) == ("running", 1, 40.0)
    callback.get_state()  # nothing pending: no new part
    assert len(part_files(tmp_path, "trials")) == 1


def test_compaction_waits_for_a_merge_still_on_the_sync_thread(tmp_path, monkeypatch):
    import time

    fsync = parts_module.fsync_file

    def slow_disk(path):
        time.sleep(0.05)
        fsync(path)

    monkeypatch.setattr(parts_module, "fsync_file", slow_disk)
    writer = ResultsWriter(tmp_path, "s", ["seed"], flush_rows=1)
    for k in range(MERGE_FANOUT):
        writer.add_evaluation(evaluation("t0", float(k), 50.0 - k))
    writer.update_trial("t0", seed=0, status="completed")
    writer.flush()
    compact(tmp_path)  # as the driver does after Tune returns, the writer's merge not yet renamed into place
    assert not (tmp_path / PARTS_DIR).exists()  # no merged part appeared after the compaction
    assert len(pq.read_table(tmp_path / EVALUATIONS_FILE)) == MERGE_FANOUT


def test_summaries_kept_up_to_date_agree_with_a_full_count(tmp_path):
    nan = float("nan")
    writer = ResultsWriter(tmp_path, "s", ["seed"])
    reports = [(1.0, 50.0, 1.1), (2.0, nan, None), (3.0, 40.0, 1.5), (4.0, 40.0, 1.2), (3.0, 45.0, 1.0),
               (5.0, float("inf"), 1.3), (6.0, 39.0, nan), (7.0, 38.0, 1.4)]
    seen = {}
    for kimg, fid, is_mean in reports:
        writer.add_evaluation({"trial_id": "t0", "kimg": kimg, "fid": fid, "is_mean": is_mean})
        seen[kimg] = (fid, is_mean)
        fids = [(f, k) for k, (f, _) in seen.items() if f is not None and f == f and abs(f) != float("inf")]
        is_values = [v for _, v in seen.values() if v is not None]
        got = writer.summary("t0")
        best_is = max(is_values, default=None)
        assert (got["evaluations"], got["best_fid"], got["best_fid_kimg"]) == (len(seen), *min(fids)), kimg
        assert got["best_is"] == best_is or (got["best_is"] != got["best_is"] and best_is != best_is), kimg


def test_compaction_removes_what_a_killed_writer_never_renamed_into_place(tmp_path):
    writer = ResultsWriter(tmp_path, "s", ["seed"], flush_rows=1)
    writer.add_evaluation(evaluation("t0", 1.0, 50.0))
    (tmp_path / PARTS_DIR / ".evaluations.1.000000000000.part.999.tmp").write_bytes(b"half a merge")
    compact(tmp_path)
    assert not (tmp_path / PARTS_DIR).exists()
    assert [r["fid"] for r in read_rows(tmp_path, "evaluations")] == [50.0]
