"""bench/graph_check.py's verdict, exercised on the CPU against an emulated CUDA graph (test_step.EmulatedGraph):
a faithful replay must AGREE, and replays broken the ways a real capture can break must DISAGREE."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_step import EmulatedGraph, images
from test_training import tiny_config

from gan.step import TrainStep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import graph_check  # noqa: E402

ITERATIONS, EXACT = 14, 8  # batch 16 of 100 images: epochs end (and reshuffle) inside both phases


class StaleBatchGraph(EmulatedGraph):
    """Every replay trains on the batch the capture saw (as if the gather had been baked into the graph)."""

    def replay(self):
        position = self.step.batches.pos_t.clone()
        super().replay()
        self.step.batches.pos_t.copy_(position)


class FrozenRandomGraph(EmulatedGraph):
    """Every replay draws the same random numbers: the same noise and the same dropout masks."""

    def replay(self):
        if not hasattr(self, "frozen"):
            self.frozen = torch.get_rng_state()
        torch.set_rng_state(self.frozen)
        super().replay()
        torch.set_rng_state(self.frozen)


class FrozenCounterGraph(EmulatedGraph):
    """Replays leave BatchNorm's num_batches_tracked alone: invisible in the losses, visible in the state."""

    def replay(self):
        counters = {n: b.clone() for n, b in self.step.G.named_buffers() if n.endswith("num_batches_tracked")}
        super().replay()
        buffers = dict(self.step.G.named_buffers())
        for name, value in counters.items():
            buffers[name].copy_(value)


def use_graph(monkeypatch, graph_class):
    monkeypatch.setattr(TrainStep, "_new_graph", lambda self: (lambda g: (g, g))(graph_class(self)))


def run_check(variant="cmhsa-gan", **kwargs):
    cfg = tiny_config(variant)
    cfg.model.attn_dropout = 0.2  # dropout on, so a frozen mask would matter
    cfg.train.batch_size = 16
    return graph_check.check(cfg, images(), torch.device("cpu"), iterations=ITERATIONS, exact=EXACT, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dcgan", "use-cmhsa-gan"])
def test_a_faithful_replay_agrees(monkeypatch, variant):
    use_graph(monkeypatch, EmulatedGraph)
    verdict, records = run_check(variant)
    assert verdict.status == "AGREE", verdict.line()
    assert records["graph"].uses_graph and not records["eager"].uses_graph
    assert verdict.first_loss_mismatch is None and verdict.state_mismatches == []
    assert verdict.worst_final[1] == 0.0  # deterministic on a CPU: bitwise equal to the end
    rows = graph_check.loss_curve(records, points=3)
    assert rows[0]["iterations"] == "1-4" and rows[-1]["iterations"].endswith(f"-{ITERATIONS}")


@pytest.mark.parametrize("graph_class, first_bad", [(StaleBatchGraph, 5), (FrozenRandomGraph, 5)],
                         ids=["stale-batch", "frozen-dropout-and-noise"])
def test_a_broken_replay_disagrees_at_the_first_wrong_iteration(monkeypatch, graph_class, first_bad):
    """3 warm-up iterations, the capture at the 4th (its replay is iteration 4); the broken replays repeat
    iteration 4's batch or random numbers from iteration 5 on."""
    use_graph(monkeypatch, graph_class)
    verdict, _ = run_check()
    assert verdict.status == "DISAGREE", verdict.line()
    assert verdict.first_loss_mismatch == first_bad
    assert any(name.startswith(("G.", "D.", "opt_")) for name in verdict.state_mismatches)


def test_a_replay_wrong_only_in_its_counters_disagrees_through_the_state(monkeypatch):
    use_graph(monkeypatch, FrozenCounterGraph)
    verdict, _ = run_check("dcgan")
    assert verdict.status == "DISAGREE", verdict.line()
    assert verdict.first_loss_mismatch is None  # the losses cannot see it ...
    assert verdict.state_mismatches and all(n.endswith("num_batches_tracked") for n in verdict.state_mismatches)


def test_no_graph_or_no_determinism_fails_instead_of_agreeing():
    verdict, records = run_check("dcgan")  # no emulation: on a CPU the capture fails and the run stays eager
    assert verdict.status == "FAIL" and "did not use a CUDA graph" in verdict.line()
    eager = records["eager"]
    graph = graph_check.RunRecord(eager.losses, eager.at_exact, eager.final, uses_graph=True)
    noisy = graph_check.RunRecord([dict(x) for x in eager.losses], eager.at_exact, dict(eager.final), True)
    noisy.losses[-1] = {k: v + 1e-6 for k, v in noisy.losses[-1].items()}
    verdict = graph_check.compare(eager, graph, noisy, exact=EXACT)
    assert verdict.status == "FAIL" and "two eager runs differ" in verdict.line()
    assert graph_check.compare(eager, graph, eager, exact=EXACT).status == "AGREE"


def test_the_long_run_tolerance_is_relative_and_per_tensor():
    base = {"G.w": torch.ones(100), "D.w": torch.full((10,), 1e-3), "opt_d[D.w].step": torch.tensor(5.0), "data.pos": 3}
    eager = graph_check.RunRecord([{"loss_d": 1.0}], base, base, uses_graph=False)

    def graph_with(final):
        return graph_check.RunRecord([{"loss_d": 1.0}], base, final, uses_graph=True)

    small = {**base, "D.w": base["D.w"] * (1 + 1e-6)}  # tiny tensor, tiny relative change
    assert graph_check.compare(eager, graph_with(small), exact=1).status == "AGREE"
    large = {**base, "D.w": base["D.w"] + 1e-4}  # 1e-4 absolute is 10% of this tensor
    verdict = graph_check.compare(eager, graph_with(large), exact=1)
    assert verdict.status == "DISAGREE" and verdict.worst_final[0] == "D.w"
    moved = {**base, "data.pos": 4}
    assert "data.pos" in graph_check.compare(eager, graph_with(moved), exact=1).line()
    assert np.isclose(verdict.worst_final[1], 0.1)
