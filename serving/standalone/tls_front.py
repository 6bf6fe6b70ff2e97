"""An optional TLS front for the gRPC port, for when it must face a network.

The stack listens on 127.0.0.1; this forwards every unary call that arrives over TLS on
``listen`` (e.g. 0.0.0.0:9443) to the plain port on loopback, bytes untouched (no decode),
with the caller's metadata (``application``, ``recserve-timeout-ms``) and its deadline::

    recserve tls-front --listen 0.0.0.0:9443 --upstream 127.0.0.1:9000 --cert server.pem --key server.key
    [--client-ca ca.pem]   # then callers must present a certificate it signed (mutual TLS)

Callers: ``grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates=...))``.
The upstream's status code and message come back unchanged.
"""

from __future__ import annotations

import asyncio

import grpc

_FORWARDED = {"application", "recserve-timeout-ms", "x-request-id"}


class _Forwarder(grpc.GenericRpcHandler):
    def __init__(self, upstream: grpc.aio.Channel):
        self.upstream = upstream

    def service(self, details: grpc.HandlerCallDetails):
        method = details.method
        call = self.upstream.unary_unary(method)  # raw bytes both ways

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            metadata = [(k, v) for k, v in context.invocation_metadata() if k in _FORWARDED]
            remaining = context.time_remaining()
            try:
                return await call(request, metadata=metadata, timeout=remaining)
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")

        return grpc.unary_unary_rpc_method_handler(forward)


async def create_tls_front(
    upstream: str, *, listen: str, cert_chain: bytes, private_key: bytes, client_ca: bytes | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start the front; returns (server, bound port). ``client_ca`` -> mutual TLS."""
    channel = grpc.aio.insecure_channel(
        upstream, options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)])
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 256 << 20)])
    server.add_generic_rpc_handlers((_Forwarder(channel),))
    credentials = grpc.ssl_server_credentials(
        [(private_key, cert_chain)], root_certificates=client_ca, require_client_auth=client_ca is not None)
    try:
        port = server.add_secure_port(listen, credentials)
    except RuntimeError as e:
        raise OSError(f"cannot bind {listen}: the port is in use") from e
    await server.start()
    return server, port


async def serve_tls_front(upstream: str, **kwargs) -> None:
    from serving.ops.server_thread import serve_until_signalled

    server, port = await create_tls_front(upstream, **kwargs)
    print(f"recserve tls-front: TLS on {kwargs['listen'].rsplit(':', 1)[0]}:{port} -> {upstream}"
          + (" (client certificates required)" if kwargs.get("client_ca") else ""), flush=True)
    await serve_until_signalled(server, grace_s=1.0, name="recserve tls-front")


def run(args) -> int:
    from pathlib import Path

    read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
    asyncio.run(serve_tls_front(args.upstream, listen=args.listen, cert_chain=read(args.cert),
                                private_key=read(args.key), client_ca=read(args.client_ca)))
    return 0
