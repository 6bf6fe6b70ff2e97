"""The search loop, after KernelEvolve.

    graph roots = hand-picked seeds (one or more per template)
    repeat until the budget of evaluations is spent, or `patience` rounds bring no gain:
        parent  = tournament over evaluated nodes (pick k at random, keep the fittest)
        child   = mutate one parameter of the parent, or switch its template (p_switch)
        gate    : child must match the reference on >= 5 seeded inputs (fitness 0 if not,
                  or if it fails to compile or launch)
        fitness = reference seconds / child seconds (same timer: events, warm-up, L2 flush)
        flag    : fitness > 10x is marked for a second look
        persist : the graph is saved after every node, so a killed search resumes

``timer(fn, label) -> seconds`` is injected: a CudaTimer on a GPU, a fake in CPU tests.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable, Sequence

from kernels.registry import Winners, make_key
from kernels.search.graph import FLAG_SPEEDUP, Node, SearchGraph
from kernels.search.space import Candidate, mutate, seeds, switch_template
from kernels.search.types import LabelledTimer, SearchProblem

GATE_SEEDS = 5


def gate(problem: SearchProblem, cand: Candidate, inputs_cache: dict[int, dict]) -> str | None:
    """None if the candidate matches the reference on every gate input, else why not."""
    for seed in range(GATE_SEEDS):
        if seed not in inputs_cache:
            inp = problem.gate_inputs(seed)
            inputs_cache[seed] = (inp, problem.reference(inp))
        inp, ref = inputs_cache[seed]
        err = problem.error(problem.run(cand, inp), ref)
        if not err <= problem.tolerance:
            return f"gate seed {seed}: relative error {err:.3g} > {problem.tolerance:g}"
    return None


def evaluate(problem: SearchProblem, node: Node, graph: SearchGraph, timer: LabelledTimer, timing_inputs: dict,
             gate_cache: dict) -> None:
    cand = node.candidate
    try:
        why = gate(problem, cand, gate_cache)
    except Exception as e:  # a compile error or a launch failure: fitness 0
        node.status, node.fitness = "compile_error", 0.0
        node.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        return
    if why is not None:
        node.status, node.fitness, node.error = "gate_failed", 0.0, why
        return
    seconds = timer(lambda: problem.run(cand, timing_inputs, poison=False), cand.key)
    node.status, node.seconds = "ok", seconds
    node.fitness = graph.reference_seconds / seconds
    node.flagged = node.fitness > FLAG_SPEEDUP


def select_parent(graph: SearchGraph, rng: random.Random, k: int = 3) -> Node:
    """Tournament selection: k random evaluated nodes, the fittest wins (failures rarely)."""
    pool = [n for n in graph.evaluated() if n.fitness > 0] or graph.evaluated() or graph.nodes
    picks = [rng.choice(pool) for _ in range(min(k, len(pool)))]
    return max(picks, key=lambda n: n.fitness)


def make_child(problem: SearchProblem, graph: SearchGraph, rng: random.Random, p_switch: float, tries: int = 50):
    """A new (never tried) candidate from a selected parent, or None if none is found."""
    for _ in range(tries):
        parent = select_parent(graph, rng)
        switch = rng.random() < p_switch
        child = (switch_template if switch else mutate)(problem.op, parent.candidate, rng)
        child = problem.normalize(child)
        if not graph.has(child):
            return child, parent.id, "switch" if switch else "mutate"
    return None


def run_search(
    problem: SearchProblem,
    *,
    graph_path: Path | None,
    timer: LabelledTimer,
    budget: int = 24,
    patience: int = 8,
    p_switch: float = 0.2,
    seed: int = 0,
    device_name: str = "",
    log: Callable[[str], None] = print,
    extra_seeds: Sequence[Candidate] = (),
    deadline: float | None = None,
) -> SearchGraph:
    """Search one problem; returns its graph (also on disk at ``graph_path``). ``budget`` is
    the number of evaluated nodes the graph may hold in all (a resumed search counts the
    nodes it already has). ``extra_seeds`` join the hand-picked roots (e.g. the winners of
    another GPU of the same compute capability); past ``deadline`` (time.monotonic()) no
    new candidate is started."""
    graph = SearchGraph.open(graph_path, op=problem.op, dtype=problem.dtype, bucket=problem.bucket,
                             device=device_name) if graph_path else SearchGraph(problem.op, problem.dtype, problem.bucket)
    rng = random.Random(f"{seed}/{problem.op}/{problem.dtype}/{problem.bucket}/{len(graph.nodes)}")
    tag = f"{problem.op}/{problem.dtype}/{problem.bucket}"
    timing_inputs = problem.timing_inputs()
    gate_cache: dict = {}
    if graph.reference_seconds is None:
        graph.reference_seconds = timer(lambda: problem.reference(timing_inputs), "reference")
        graph.save()
    log(f"[{tag}] reference {graph.reference_seconds * 1e6:.1f} us; {len(graph.evaluated())} nodes done")

    # roots first (also re-runs any node left pending by an interrupted search)
    for cand in (problem.normalize(c) for c in [*seeds(problem.op), *extra_seeds]):
        if not graph.has(cand):
            graph.add(cand, parent=None, made_by="seed")
    def time_left() -> bool:
        return deadline is None or time.monotonic() < deadline

    for node in graph.nodes:
        if node.status == "pending" and len(graph.evaluated()) < budget and time_left():
            _evaluate_logged(problem, node, graph, timer, timing_inputs, gate_cache, log, tag)

    best = graph.best()
    best_fitness = best.fitness if best else 0.0
    while len(graph.evaluated()) < budget and graph.rounds_since_gain < patience and time_left():
        made = make_child(problem, graph, rng, p_switch)
        if made is None:
            log(f"[{tag}] space exhausted around the parents")
            break
        cand, parent, how = made
        node = graph.add(cand, parent=parent, made_by=how)
        _evaluate_logged(problem, node, graph, timer, timing_inputs, gate_cache, log, tag)
        graph.rounds += 1
        if node.fitness > best_fitness * 1.01:  # a gain must beat timing noise
            best_fitness = node.fitness
            graph.rounds_since_gain = 0
        else:
            graph.rounds_since_gain += 1
        graph.save()
    best = graph.best()
    if best:
        log(f"[{tag}] best {best.candidate.key}: {best.fitness:.2f}x ({best.seconds * 1e6:.1f} us)"
            + (" FLAGGED >10x" if best.flagged else ""))
    else:
        log(f"[{tag}] no candidate passed the gate")
    return graph


def _evaluate_logged(problem: SearchProblem, node, graph, timer, timing_inputs, gate_cache, log, tag) -> None:
    t0 = time.perf_counter()
    evaluate(problem, node, graph, timer, timing_inputs, gate_cache)
    graph.save()
    took = time.perf_counter() - t0
    result = (f"{node.fitness:.2f}x {node.seconds * 1e6:.1f} us" if node.status == "ok"
              else f"{node.status}: {node.error}")
    log(f"[{tag}] #{node.id} {node.made_by:6s} {node.candidate.key} -> {result} ({took:.1f}s)")


MIN_SPEEDUP = 1.1  # a winner must beat the reference by more than run-to-run timing noise


def record_winner(winners: Winners, graph: SearchGraph, min_speedup: float = MIN_SPEEDUP) -> dict:
    """Write the graph's outcome into the winners table: its best candidate if it beat the
    reference by more than ``min_speedup``, else an explicit 'reference' entry."""
    best = graph.best()
    key = make_key(graph.op, graph.dtype, graph.bucket)
    if best is not None and best.fitness > min_speedup:
        entry = {"backend": "triton", "template": best.template, "config": best.config,
                 "speedup": round(best.fitness, 3), "kernel_us": round(best.seconds * 1e6, 2),
                 "reference_us": round(graph.reference_seconds * 1e6, 2), "flagged": best.flagged,
                 "evaluated": len(graph.evaluated())}
    else:
        entry = {"backend": "reference", "speedup": round(best.fitness, 3) if best else 0.0,
                 "reference_us": round((graph.reference_seconds or 0) * 1e6, 2),
                 "evaluated": len(graph.evaluated())}
    winners.entries[key] = entry
    return entry
