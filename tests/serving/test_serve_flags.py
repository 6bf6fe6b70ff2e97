"""`recserve serve`'s settings flags come from AppArgs: same names, types, choices and defaults."""

from __future__ import annotations

import pytest

from recserve.cli import build_parser
from recserve.cli.serve import FADING_FILTER, app_args_from
from serving.config import AppArgs


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_every_scalar_appargs_field_is_a_flag_with_the_model_default():
    args = parse()
    built = app_args_from(args, package="pkg")
    expected = AppArgs(package="pkg", feature_filter=FADING_FILTER)  # serve's one override: fading on
    assert built == expected
    for name, field in AppArgs.model_fields.items():
        if name in ("package", "shard_batching", "tower_batching"):
            continue
        assert hasattr(args, name), f"AppArgs.{name} has no --{name.replace('_', '-')} flag"


def test_flags_parse_to_typed_appargs_and_none_turns_the_filter_off():
    built = app_args_from(parse("--transport", "reference", "--max-batch-size", "64", "--default-timeout-s", "2.5",
                                "--feature-filter", "none"), package="p")
    assert (built.transport, built.max_batch_size, built.default_timeout_s, built.feature_filter) == (
        "reference", 64, 2.5, None)


def test_a_value_outside_the_model_choices_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit):
        parse("--transport", "carrier-pigeon")
    assert "--transport: invalid choice" in capsys.readouterr().err


def test_a_value_the_model_rejects_is_reported_by_flag_before_anything_starts(tmp_path, monkeypatch, capsys):
    from recserve.cli import main

    monkeypatch.setenv("RECSERVE_ARTIFACTS", str(tmp_path))
    assert main(["serve", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size: Input should be greater than 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_rule_across_fields_is_reported_too(tmp_path, monkeypatch, capsys):
    from recserve.cli import main

    monkeypatch.setenv("RECSERVE_ARTIFACTS", str(tmp_path))
    assert main(["serve", "--log-rate", "0.5"]) == 2  # no --log-dir
    assert "log_dir: required when log_rate > 0" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (("--router-replicas", "3", "--router-max-replicas", "2"), "router_max_replicas: 2 is below router_replicas 3"),
    (("--ingress", "direct", "--router-max-replicas", "4"), "--ingress direct serves --port from one Router replica; "
                                                            "--router-max-replicas 4 needs --ingress shared"),
])
def test_router_autoscaling_that_cannot_work_is_refused_by_name_before_anything_starts(flags, message, tmp_path,
                                                                                       monkeypatch, capsys):
    from recserve.cli import main

    monkeypatch.setenv("RECSERVE_ARTIFACTS", str(tmp_path))
    assert main(["serve", *flags]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, cores, threads", [
    ((), 16, 16),                                   # one tower: the node's cores, as the monolith
    (("--tower-replicas", "4"), 16, 4),             # replicas share them
    (("--tower-replicas", "3"), 2, 1),              # never below one
    (("--torch-threads", "2", "--tower-replicas", "4"), 16, 2),  # the flag wins
])
def test_a_tower_replica_takes_the_nodes_cores_over_the_tower_replicas(flags, cores, threads):
    assert app_args_from(parse(*flags), package="p").tower_threads(cores) == threads


@pytest.mark.parametrize("fields, door", [
    ({}, (32, 32)),  # one router: the whole door
    ({"router_replicas": 4}, (8, 8)),  # four routers wait on one tower: a quarter each
    ({"router_replicas": 3, "max_queued": 8}, (11, 3)),  # rounded up
    ({"router_replicas": 2, "router_max_replicas": 6}, (6, 6)),  # autoscaling: shared by the most there may be
    ({"router_replicas": 64}, (1, 1)),  # never a door that takes nothing
])
def test_the_routers_share_the_stacks_door(fields, door):
    assert AppArgs(package="p", **fields).router_door() == door
