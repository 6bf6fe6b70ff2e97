"""A bench or test server whose port another process takes between free_port() and the server's
own bind (parallel test workers ask the kernel for ports at once) starts on another port, as a
real `recserve serve --monolith` refuses the taken one."""

from __future__ import annotations

import socket

from loadtest.targets import MonolithServer, model_info


def test_a_port_taken_after_it_was_chosen_is_replaced(tiny_packages, tmp_path):
    server = MonolithServer(tiny_packages("singular-1"), log_dir=tmp_path)
    chosen = server.port
    with socket.create_server(("127.0.0.1", chosen)):  # another process's server, there first
        with server:
            assert server.port != chosen and server.address.endswith(f":{server.port}")
            assert model_info(server.address).model
    fixed = MonolithServer(tiny_packages("singular-1"), log_dir=tmp_path, port=chosen)
    assert not fixed._port_chosen  # a port the caller named is never replaced
