"""Ports of `recserve serve`: the gRPC port must be free (refused at once, never shared); the
dashboard and HTTP ports fall back to free ones. No fixed port: every port here is the kernel's."""

from __future__ import annotations

import asyncio
import socket

import pytest

from recserve.cli import main
from serving.ops.ports import ServePorts, free_port, port_is_free


def listen(port: int = 0, *, reuseport: bool = False, host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    if reuseport:  # as Serve's proxy and grpc servers bind by default
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    s.listen()
    return s


@pytest.mark.parametrize("host, reuseport", [("127.0.0.1", False), ("::", True), ("0.0.0.0", True)])
def test_a_port_held_on_any_address_counts_as_taken_even_when_shared(host, reuseport):
    with listen(reuseport=reuseport, host=host) as held:
        assert not port_is_free(held.getsockname()[1])
    assert port_is_free(free_port())


def test_a_taken_grpc_port_is_refused_before_anything_is_trained(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECSERVE_ARTIFACTS", str(tmp_path))  # no default model there: it would train
    with listen(reuseport=True, host="::") as held:
        port = held.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"gRPC port {port} is already in use" in err and "--port PORT" in err
    assert list(tmp_path.iterdir()) == []  # nothing trained or exported


def test_dashboard_and_http_ports_fall_back_to_free_ones_and_say_so():
    with listen() as dash, listen() as http:
        taken_dash, taken_http = dash.getsockname()[1], http.getsockname()[1]
        grpc = free_port()
        ports = ServePorts.choose(grpc=grpc, dashboard=taken_dash, http=taken_http)
        assert ports.grpc == grpc
        assert ports.dashboard != taken_dash and port_is_free(ports.dashboard)
        assert ports.http not in (taken_http, grpc, ports.dashboard) and port_is_free(ports.http)
        lines = ports.describe()
    assert f"127.0.0.1:{ports.http} ({taken_http} was taken" in lines[1]
    assert f"http://127.0.0.1:{ports.dashboard} ({taken_dash} was taken" in ports.describe_dashboard(
        f"127.0.0.1:{ports.dashboard}")
    free = ServePorts.choose(grpc=free_port(), dashboard=ports.dashboard, http=ports.http)
    assert free.dashboard == ports.dashboard and "taken" not in " ".join(free.describe())
    assert free.ray_dashboard_port == ports.dashboard  # any port but Ray's default is passed as chosen


def test_a_second_monolith_on_the_same_port_fails_to_bind_instead_of_sharing(tiny_packages):
    from serving.standalone.monolith import create_server

    async def two_servers():
        first, port = await create_server(tiny_packages("singular-1"), 0)
        try:
            with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{port}"):
                await create_server(tiny_packages("singular-1"), port)
        finally:
            await first.stop(grace=None)

    asyncio.run(two_servers())


def test_the_free_ports_of_one_command_line_never_coincide():
    """free_port() releases its probe socket, so the kernel may hand the same port out again
    before the caller binds it: a command line with --port, --dashboard-port and --http-port each
    from free_port() once got two equal ports. A process is never handed a port twice in a row of
    1024, nor one it asked to avoid."""
    handed = [free_port() for _ in range(300)]
    assert len(set(handed)) == len(handed)
    avoid = {free_port() for _ in range(5)}
    assert free_port(avoid=avoid) not in avoid


def test_serve_ports_are_distinct_even_when_the_same_port_is_asked_for_twice():
    grpc = free_port()
    ports = ServePorts.choose(grpc=grpc, dashboard=grpc, http=grpc)  # grpc is not bound yet: free
    assert len({ports.grpc, ports.dashboard, ports.http}) == 3 and ports.grpc == grpc
    spare = free_port()
    ports = ServePorts.choose(grpc=0, dashboard=spare, http=spare)
    assert len({ports.grpc, ports.dashboard, ports.http}) == 3
