"""The search: gate, fitness, selection, termination, persistence and resume, winners.

Most tests drive the search loop with a toy problem and a fake timer (a plain function of
the candidate), so the expected outcome is known; one test runs the real lookup problem
through the Triton interpreter on a tiny workload."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from kernels.registry import Winners
from kernels.search.evolve import GATE_SEEDS, record_winner, run_search
from kernels.search.graph import SearchGraph
from kernels.search.problems import EmbeddingBagProblem, problems_for
from kernels.search.space import SPACES, prior_seeds, seeds
from kernels.search.types import SearchProblem


@dataclass
class ToyProblem:
    """Lookup-shaped search space; output is correct unless the config is 'broken'."""

    op: str = "embedding_bag"
    dtype: str = "fp16"
    bucket: str = "d128_p8_b512"
    tolerance: float = 1e-6
    broken_block_n: int = 4  # multi_bag with BLOCK_N=4 (a seed has it) returns wrong numbers
    crash_template: str = "split_bag"  # (a seed has it) "fails to compile"

    def normalize(self, cand):
        return cand

    def gate_inputs(self, seed):
        return torch.arange(4.0) + seed

    def timing_inputs(self):
        return torch.arange(4.0)

    def reference(self, x):
        return x * 2

    def run(self, cand, x, poison=True):
        cfg = cand.cfg
        if cand.template == self.crash_template:
            raise RuntimeError("PassManager::run failed")
        if cand.template == "multi_bag" and cfg["BLOCK_N"] == self.broken_block_n:
            return x * 2 + 1
        return x * 2

    def error(self, out, ref):
        return float((out - ref).abs().max())


def fake_timer(ref_seconds=100e-6):
    """Seconds as a known function of the config: more rows per step and 2 warps are fast."""
    def timer(fn, label):
        if label == "reference":
            return ref_seconds
        cfg = dict(kv.split("=") for kv in label.split(":")[1].split(","))
        width = int(cfg.get("BAGS", 1)) * int(cfg["BLOCK_N"])
        return 50e-6 / width + 1e-6 * abs(int(cfg["num_warps"]) - 2) + 2e-6
    return timer


def test_search_beats_its_seeds_and_records_the_fittest_node_as_winner(tmp_path):
    graph = run_search(ToyProblem(), graph_path=tmp_path / "g.json", timer=fake_timer(), budget=40,
                       patience=40, log=lambda m: None)
    seeds_best = max(n.fitness for n in graph.nodes if n.made_by == "seed")
    best = graph.best()
    assert best.fitness > seeds_best
    assert best.fitness == max(n.fitness for n in graph.nodes)
    assert best.config.get("BAGS", 1) * best.config["BLOCK_N"] >= 32  # moved toward the known optimum
    winners = Winners()
    entry = record_winner(winners, graph)
    assert entry["backend"] == "triton" and entry["config"] == best.config
    choice = winners.lookup("embedding_bag", "fp16", "d128_p8_b512")
    assert choice.template == best.template and choice.config == best.config


def test_candidates_that_fail_the_gate_or_crash_get_fitness_zero(tmp_path):
    graph = run_search(ToyProblem(), graph_path=tmp_path / "g.json", timer=fake_timer(), budget=60,
                       patience=60, log=lambda m: None)
    crashed = [n for n in graph.nodes if n.template == "split_bag"]
    broken = [n for n in graph.nodes if n.template == "multi_bag" and n.config["BLOCK_N"] == 4]
    assert crashed and all(n.status == "compile_error" and n.fitness == 0 and "PassManager" in n.error for n in crashed)
    assert broken and all(n.status == "gate_failed" and n.fitness == 0 for n in broken)
    assert graph.best().status == "ok"


def test_children_are_one_step_mutations_or_template_switches_of_their_parent(tmp_path):
    graph = run_search(ToyProblem(), graph_path=tmp_path / "g.json", timer=fake_timer(), budget=30,
                       patience=30, log=lambda m: None)
    children = [n for n in graph.nodes if n.parent is not None]
    assert children
    for n in children:
        parent = graph.nodes[n.parent]
        if n.made_by == "mutate":
            assert n.template == parent.template
            assert sum(n.config[k] != parent.config[k] for k in n.config) == 1
        else:
            assert n.made_by == "switch" and n.template != parent.template
            assert set(n.config) == set(SPACES["embedding_bag"][n.template])
    keys = [n.candidate for n in graph.nodes]
    assert len(keys) == len(set(keys)), "a candidate was evaluated twice"


def test_an_interrupted_search_resumes_from_its_graph_on_disk(tmp_path):
    path = tmp_path / "g.json"
    first = run_search(ToyProblem(), graph_path=path, timer=fake_timer(), budget=8, patience=99, log=lambda m: None)
    saved = json.loads(path.read_text())
    assert len(saved["nodes"]) == 8 and saved["reference_seconds"] == pytest.approx(100e-6)

    calls = []

    def counting_timer(fn, label):
        calls.append(label)
        return fake_timer()(fn, label)

    resumed = run_search(ToyProblem(), graph_path=path, timer=counting_timer, budget=14, patience=99,
                         log=lambda m: None)
    assert len(resumed.nodes) == 14
    assert [n.candidate for n in resumed.nodes[:8]] == [n.candidate for n in first.nodes]
    assert "reference" not in calls  # the reference time was kept, not re-measured
    assert len(calls) <= 6  # only the new nodes were timed
    with pytest.raises(ValueError, match="holds"):
        SearchGraph.open(path, op="interaction", dtype="fp16", bucket="d128_p8_b512")


def test_winners_of_another_gpu_join_the_roots_completed_to_the_search_space(tmp_path):
    other = Winners({
        "embedding_bag/fp16/d128_p8_b512": {"backend": "triton", "template": "multi_bag",
                                            "config": {"BAGS": 32, "BLOCK_N": 2, "BLOCK_D": 128, "num_warps": 2}},
        "embedding_bag/fp16/d128_p8_b4096": {"backend": "reference"},
        "embedding_bag/int8/d128_p8_b512": {"backend": "triton", "template": "per_bag",
                                            "config": {"BLOCK_N": 2, "BLOCK_D": 64, "num_warps": 1}},
    })
    extra = prior_seeds(other, "embedding_bag", "fp16")
    assert [c.template for c in extra] == ["multi_bag"]  # fp16 only, triton entries only
    cfg = extra[0].cfg
    assert set(cfg) == set(SPACES["embedding_bag"]["multi_bag"])  # EVICT, num_stages from the seed
    assert (cfg["BAGS"], cfg["BLOCK_N"], cfg["num_warps"]) == (32, 2, 2)
    graph = run_search(ToyProblem(), graph_path=tmp_path / "g.json", timer=fake_timer(), budget=10, patience=10,
                       log=lambda m: None, extra_seeds=extra)
    roots = [n.candidate for n in graph.nodes if n.made_by == "seed"]
    assert roots == [*seeds("embedding_bag"), *extra]
    assert graph.best().candidate == extra[0]  # 64 rows per step: the fittest of the roots here


def test_a_search_past_its_deadline_starts_no_candidate_and_resumes_later(tmp_path):
    import time

    path = tmp_path / "g.json"
    graph = run_search(ToyProblem(), graph_path=path, timer=fake_timer(), budget=10, patience=10,
                       log=lambda m: None, deadline=time.monotonic())
    assert graph.evaluated() == [] and all(n.status == "pending" for n in graph.nodes)
    resumed = run_search(ToyProblem(), graph_path=path, timer=fake_timer(), budget=10, patience=10,
                         log=lambda m: None)
    assert len(resumed.evaluated()) == 10


def test_search_stops_after_patience_rounds_without_gain(tmp_path):
    flat = lambda fn, label: 100e-6 if label == "reference" else 50e-6  # noqa: E731  every candidate 2x
    graph = run_search(ToyProblem(), graph_path=tmp_path / "g.json", timer=flat, budget=100, patience=5,
                       log=lambda m: None)
    assert graph.rounds == 5 and graph.rounds_since_gain == 5
    assert len(graph.nodes) == len(seeds("embedding_bag")) + 5  # the seeds, then five rounds without gain


def test_speedups_above_ten_are_flagged_and_a_slower_bucket_keeps_the_reference(tmp_path):
    graph = run_search(ToyProblem(), graph_path=tmp_path / "a.json", timer=fake_timer(ref_seconds=1e-3),
                       budget=6, patience=6, log=lambda m: None)
    assert graph.best().fitness > 10 and graph.best().flagged
    slow = run_search(ToyProblem(), graph_path=tmp_path / "b.json", timer=fake_timer(ref_seconds=1e-6),
                      budget=6, patience=6, log=lambda m: None)
    winners = Winners()
    assert record_winner(winners, slow)["backend"] == "reference"
    assert winners.lookup("embedding_bag", "fp16", "d128_p8_b512").backend == "reference"


class _BrokenMultiBag(EmbeddingBagProblem):
    def run(self, cand, inputs, poison=True):
        out = super().run(cand, inputs, poison)
        return out + 1e-3 if cand.template == "multi_bag" else out


def test_real_lookup_problem_gate_runs_the_triton_kernel_on_ragged_and_empty_bags(tmp_path, device):
    (problem,) = problems_for("embedding_bag", "tiny", dtypes=["int4"], batches=[3], device=device)
    for seed in range(GATE_SEEDS):
        inp = problem.gate_inputs(seed)
        lengths = (inp["offsets"][1:] - inp["offsets"][:-1]).tolist()
        assert 0 in lengths and len(set(lengths)) > 1  # empty and ragged bags in every gate input
    broken = _BrokenMultiBag(**{k: getattr(problem, k) for k in ("dtype", "rows", "dims", "pooling", "batch", "device")})
    graph = run_search(broken, graph_path=tmp_path / "g.json", timer=lambda fn, label: 1e-4 if label == "reference" else 5e-5,
                       budget=len(seeds("embedding_bag")), patience=0, log=lambda m: None)
    assert graph.bucket == "d8_p4_b4"  # tiny: mean pooling (1+1+10+3)/4 -> 4
    status = {n.template: n.status for n in graph.nodes}
    assert status == {"per_bag": "ok", "multi_bag": "gate_failed", "split_bag": "ok"}


def test_workload_problems_cover_every_dtype_and_batch_and_the_dcn_layers():
    eb = problems_for("embedding_bag", "dlrmv2", dtypes=["fp16", "int8"], batches=[512, 4096], device=torch.device("cpu"))
    assert {(p.dtype, p.bucket) for p in eb} == {("fp16", "d128_p8_b512"), ("fp16", "d128_p8_b4096"),
                                                 ("int8", "d128_p8_b512"), ("int8", "d128_p8_b4096")}
    inter = problems_for("interaction", "dlrmv2", dtypes=["fp16", "int8"], batches=[4096], device=torch.device("cpu"))
    # dlrmv2's own interaction (DCNv2) first: a time-bounded search reaches it before the dot
    assert [(p.op, p.bucket) for p in inter] == [("dcn_cross", "n4096_r512_b4096"), ("interaction", "n27_d128_b4096")]


def test_every_problem_of_every_op_and_the_toy_one_satisfy_the_search_problem_interface():
    cpu = torch.device("cpu")
    problems = [*problems_for("embedding_bag", "dlrmv2", dtypes=["fp16"], batches=[4], device=cpu),
                *problems_for("interaction", "dlrmv2", dtypes=["fp32"], batches=[4], device=cpu), ToyProblem()]
    assert {p.op for p in problems} == {"embedding_bag", "interaction", "dcn_cross"}
    assert all(isinstance(p, SearchProblem) for p in problems)
    assert not isinstance(object(), SearchProblem)
