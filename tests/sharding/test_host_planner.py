"""Planning for several hosts (Ray nodes): per-shard memory from a host's, and which host holds
each shard replica (sharding/hosts.py), and the Ray options that place them (serving/app/nodes.py)."""

from __future__ import annotations

import itertools

import pytest

from sharding import GpuReserve, PlannerError, PlannerErrorType, TableSpec, plan
from sharding.hosts import HOST_LABEL, HostTopology, assign_hosts, plan_for_hosts
from serving.app.nodes import node_placement

NO_RESERVE = GpuReserve(fraction=0.0, fixed=0)
TABLES = [TableSpec(name=f"t{i}", rows=rows, dim=8) for i, rows in enumerate([1000, 700, 500, 300, 200])]  # 32 B/row


def test_shard_memory_is_the_host_less_reserve_over_the_shards_per_host():
    t = HostTopology(hosts=3, host_memory=10_000, shard_replicas=2, reserve=GpuReserve(fraction=0.1, fixed=500))
    assert t.usable_memory == 10_000 - 1000 - 500
    assert t.shards_per_host(4) == 3  # 8 replicas over 3 hosts
    assert t.shard_memory(4) == 8500 // 3


@pytest.mark.parametrize("hosts,replicas", [(1, 1), (2, 1), (3, 1), (2, 2), (3, 2)])
def test_a_plan_for_hosts_fits_them_with_every_replica_of_a_shard_on_its_own_host(hosts, replicas):
    total = sum(t.bytes for t in TABLES)
    topology = HostTopology(hosts=hosts, host_memory=int(total * replicas / hosts * 1.3) + 4000,
                            shard_replicas=replicas, reserve=NO_RESERVE)
    p = plan_for_hosts(TABLES, strategy="capacity", topology=topology)
    assignment = assign_hosts(p, {f"h{i}": topology.usable_memory for i in range(hosts)}, shard_replicas=replicas)
    for shard_hosts in assignment.shards:
        assert len(shard_hosts) == replicas == len(set(shard_hosts))
    for host, used in assignment.used.items():
        held = sum(sh.bytes for sh, hs in zip(p.shards, assignment.shards) if host in hs)
        assert used == held <= topology.usable_memory


def test_tables_larger_than_one_host_are_refused_naming_the_table_and_fit_two():
    total = sum(t.bytes for t in TABLES)
    one = HostTopology(hosts=1, host_memory=total // 2 + 1000, reserve=NO_RESERVE)
    with pytest.raises(PlannerError) as e:
        plan_for_hosts(TABLES, strategy="table", topology=one)
    assert e.value.error_type is PlannerErrorType.INSUFFICIENT_MEMORY
    assert "table 't" in str(e.value) and "1 host(s)" in str(e.value)
    two = HostTopology(hosts=2, host_memory=total // 2 + 1000, reserve=NO_RESERVE)
    assert plan_for_hosts(TABLES, strategy="capacity", topology=two).num_shards >= 2


def test_a_package_placed_on_too_small_hosts_is_refused_naming_the_table_that_overflows():
    p = plan(TABLES, strategy="singular", num_shards=1)  # one shard of every table: 86,400 bytes
    with pytest.raises(PlannerError) as e:
        assign_hosts(p, {"h1": 60_000})
    # t0 (32,000) and t1 (22,400) fit 60,000; t2 (16,000) overflows it
    assert "table 't2'" in str(e.value) and "'h1'" in str(e.value) and "60,000" in str(e.value)
    assert e.value.details["table"] == "t2"


def test_replicas_are_spread_largest_shard_first_onto_the_host_with_most_room():
    p = plan(TABLES, strategy="table", num_shards=5)
    a = assign_hosts(p, {"h1": 40_000, "h2": 40_000, "h3": 20_000})
    assert a.shards[0] == ("h1",) and a.shards[1] == ("h2",)  # 32,000 and 22,400 bytes
    assert max(a.used.values()) <= 40_000 and a.used["h3"] <= 20_000
    with pytest.raises(PlannerError, match="need as many hosts"):
        assign_hosts(p, {"h1": 10**9}, shard_replicas=2)


def test_node_placement_pins_shards_to_their_hosts_with_a_fallback_to_any_host_with_room():
    p = plan(TABLES, strategy="table", num_shards=5)
    placement = node_placement(p, {"h0": 1, "h1": 10**6, "h2": 10**6}, shard_replicas=2,
                               router_host="h0", tower_host="h0")
    for k, sh in enumerate(p.shards):
        opts = placement.shard_options(k)
        hosts = placement.assignment.shards[k]
        assert opts["label_selector"] == {HOST_LABEL: f"in({','.join(hosts)})"} and "h0" not in hosts
        assert opts["fallback_strategy"] == [{"label_selector": {HOST_LABEL: "in(h0,h1,h2)"}}]
        assert opts["memory"] == sh.bytes  # Ray never stacks more shards on a host than it holds
    assert placement.shard_deployment_options() == {"max_replicas_per_node": 1}
    assert placement.router_options() == placement.tower_options() == {"label_selector": {HOST_LABEL: "in(h0)"}}
    with pytest.raises(PlannerError, match="router_host: no alive Ray node is labelled recserve-host=h9"):
        node_placement(p, {"h1": 10**6}, router_host="h9")


def test_the_assignment_is_deterministic():
    p = plan(TABLES, strategy="table", num_shards=5)
    budgets = {"a": 70_000, "b": 70_000, "c": 70_000}
    results = {assign_hosts(p, budgets, shard_replicas=2).shards for _ in itertools.repeat(None, 3)}
    assert len(results) == 1


def test_recserve_plan_for_hosts_prints_each_hosts_shards_and_refuses_one_host_naming_the_table(capsys):
    from recserve.cli import main

    # dlrmv2 (~98 GB fp32) over 2 hosts of 256 GB; one host of 64 GB holds 30 GB after the reserve
    assert main(["plan", "--workload", "dlrmv2", "--strategy", "load", "--hosts", "2", "--host-memory", "256GB"]) == 0
    out = capsys.readouterr().out
    assert "2 host(s) x 256,000,000,000 bytes" in out and "h0" in out and "h1" in out and "shard-0" in out
    assert main(["plan", "--workload", "dlrmv2", "--strategy", "load", "--hosts", "1", "--host-memory", "64GB"]) == 2
    assert "cannot place table 't_cat_" in capsys.readouterr().err
