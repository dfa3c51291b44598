"""Parquet column types come from the sweep schema, not from whichever values a snapshot holds."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.results import EVALUATIONS_FILE, TRIALS_FILE, ResultsWriter

PARAMS = ["amp", "beta1", "g_widths", "heads", "lr_d", "seed", "variant"]
# Written out by hand from gan.config's field types: the independent reference.
EXPECTED = {"amp": pa.bool_(), "beta1": pa.float64(), "g_widths": pa.string(), "heads": pa.int64(),
            "lr_d": pa.float64(), "seed": pa.int64(), "variant": pa.string()}


def parameter_schema(path) -> dict[str, pa.DataType]:
    schema = pq.read_schema(path)
    return {name: schema.field(name).type for name in PARAMS}


def test_conditional_column_keeps_its_type_from_the_first_snapshot_to_the_last(tmp_path):
    writer = ResultsWriter(tmp_path, "s", PARAMS)
    # Early snapshot: only a trial where the conditional `heads` does not apply, and beta1 unset.
    writer.update_trial("t0", amp=True, beta1=None, g_widths="64-32", heads=None, lr_d=1e-4, seed=0, variant="dcgan")
    writer.add_evaluation({"trial_id": "t0", "amp": True, "beta1": None, "g_widths": "64-32", "heads": None,
                           "lr_d": 1e-4, "seed": 0, "variant": "dcgan", "kimg": 1.0, "fid": 10.0})
    early = (parameter_schema(tmp_path / TRIALS_FILE), parameter_schema(tmp_path / EVALUATIONS_FILE))
    writer.update_trial("t1", amp=False, beta1=0.5, g_widths="64-32", heads=4, lr_d=2e-4, seed=1, variant="cmhsa-gan")
    late = (parameter_schema(tmp_path / TRIALS_FILE), parameter_schema(tmp_path / EVALUATIONS_FILE))
    assert early == late == (EXPECTED, EXPECTED)
    assert pq.read_table(tmp_path / TRIALS_FILE).column("heads").to_pylist() == [None, 4]


def test_two_sweeps_with_the_same_parameters_write_the_same_types(tmp_path):
    # One sweep's lr_d values happen to be whole numbers in YAML; the other's are not.
    for name, lr_d in (("a", 1), ("b", 1.5e-4)):
        ResultsWriter(tmp_path / name, name, PARAMS).update_trial(
            "t0", amp=True, beta1=None, g_widths="8", heads=None, lr_d=lr_d, seed=0, variant="dcgan")
    assert parameter_schema(tmp_path / "a" / TRIALS_FILE) == parameter_schema(tmp_path / "b" / TRIALS_FILE) == EXPECTED


def test_a_value_that_does_not_fit_the_schema_type_is_refused_not_truncated(tmp_path):
    writer = ResultsWriter(tmp_path, "s", ["heads"])
    with pytest.raises(pa.ArrowInvalid):
        writer.update_trial("t0", heads=2.5)
