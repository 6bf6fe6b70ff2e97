"""Talking to the HAProxy front's control socket (serving/standalone/haproxy_front.py): one
command and its answer, and a server telling the front how many calls it takes now. Here, under
the serving layers, so that a Router replica (serving/app) can tell its front without importing
the front itself."""

from __future__ import annotations


def command(stats_socket: str, text: str, timeout_s: float = 5.0) -> str:
    """One command on HAProxy's control socket; its answer."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout_s)
        s.connect(stats_socket)
        s.sendall(text.encode() + b"\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out.decode()


def tell_depth(stats_socket: str, line: int, calls: int) -> None:
    """Tell the front on ``stats_socket`` (``told``) that the server of its ``line``-th line takes
    ``calls`` calls now; OSError when the front cannot be reached."""
    said = command(stats_socket, f"experimental-mode on; set var proc.cap_s{int(line)} int({int(calls)})", 1.0)
    if said.strip():
        raise OSError(f"the front refused the depth of line {line}: {said.strip()}")


def depth_teller(stats_socket: str):
    """``tell(line, calls)``: :func:`tell_depth` on ``stats_socket`` that lets a front it cannot reach
    pass (starting, stopping: it hears the next change), logged at debug level."""
    import logging

    def tell(line: int, calls: int) -> None:
        try:
            tell_depth(stats_socket, line, calls)
        except OSError as e:
            logging.getLogger(__name__).debug("the front was not told the door's depth %d: %s", calls, e)

    return tell
