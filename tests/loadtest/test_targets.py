"""The bench compares equal work: the sharded stack and the monolith run the same feature
filter, read from the command lines they are started with through ``recserve serve``'s own
parser (its flags come from AppArgs); no server is started here."""

import pytest

from loadtest.targets import MonolithServer, ServeStack, feature_filter_of
from recserve.cli.main import build_parser
from recserve.cli.serve import FADING_FILTER, app_args_from


def _app_args(argv: list[str]):
    """The AppArgs a ``python -m recserve.cli serve ...`` command line runs with."""
    assert argv[1:4] == ["-m", "recserve.cli", "serve"], argv
    ns = build_parser().parse_args(argv[3:])
    return app_args_from(ns, package=ns.package)


@pytest.mark.parametrize("serve_args", [
    (),
    ("--feature-filter", FADING_FILTER),
    (f"--feature-filter={FADING_FILTER}",),
    ("--feature-filter", "none"),
    ("--transport", "grpc"),
])
def test_both_servers_of_a_bench_run_the_same_feature_filter(tmp_path, serve_args):
    stack = ServeStack(tmp_path / "pkg", name="table-2", log_dir=tmp_path, extra_args=serve_args)
    mono = MonolithServer(tmp_path / "pkg", log_dir=tmp_path, feature_filter=feature_filter_of(serve_args))
    sharded = _app_args(stack.argv()).feature_filter
    assert sharded == _app_args(mono.argv()).feature_filter
    assert sharded == (FADING_FILTER if FADING_FILTER in " ".join(serve_args) else None)


def test_recserve_serve_itself_defaults_to_fading_so_the_bench_must_say_none():
    """Guards the test above: the serve command's own default differs from the monolith's."""
    assert _app_args(["python", "-m", "recserve.cli", "serve"]).feature_filter == FADING_FILTER


@pytest.mark.parametrize("serve_args, front", [((), "none"), (("--front", "haproxy"), "haproxy"),
                                               (("--front=auto",), "auto")])
def test_both_servers_of_a_bench_run_without_the_front_unless_asked(tmp_path, serve_args, front):
    """`recserve serve` puts HAProxy in front by default ('auto'); the bench compares data paths,
    so both servers say --front none, and a --front among the stack's extra arguments wins."""
    parse = build_parser().parse_args
    stack = ServeStack(tmp_path / "pkg", name="load-2", log_dir=tmp_path, extra_args=serve_args)
    assert parse(stack.argv()[3:]).front == front
    assert parse(MonolithServer(tmp_path / "pkg", log_dir=tmp_path).argv()[3:]).front == "none"
    assert parse(["serve"]).front == "auto"
