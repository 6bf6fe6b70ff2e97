"""The FadingControl gRPC servicer (protos/recserve/v1/fading.proto) and its server.

Thin: authenticate, call a transition on the store, encode the new state. Errors leave in
one place (:func:`_status_of`): bad input INVALID_ARGUMENT naming the field, a change not
allowed in the current state FAILED_PRECONDITION, an unknown feature NOT_FOUND.

Authentication: every call carries ``authorization: Bearer <token>``. The server knows a
set of tokens, each with a principal name (who the audit log records). No token:
UNAUTHENTICATED; a token it does not know: PERMISSION_DENIED. Tokens come from a file of
``principal token`` lines (``--tokens-file``) or ``$RECSERVE_FADE_TOKEN`` (principal
``$RECSERVE_FADE_PRINCIPAL``, default ``operator``). Compare in constant time.

The server also drives schedules: a background task advances every running schedule
whose soak has ended, even when no router is taking traffic (routers do the same; the
store's transactions make the two agree).

    server, port = await create_server(store, tokens={"s3cret": "alice"}, port=0)
"""

from __future__ import annotations

import asyncio
import hmac
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

import grpc

from recserve.v1 import fading_pb2, fading_pb2_grpc
from serving.fading import schedule as sched
from serving.fading.proto import schedule_from_proto, state_to_proto, thresholds_from_proto
from serving.fading.schedule import FeatureState, Status, TransitionError
from serving.fading.store import FadingStore, NotFound
from serving.ops.server_thread import ServerThread, serve_until_signalled

ENV_TOKEN = "RECSERVE_FADE_TOKEN"
ENV_PRINCIPAL = "RECSERVE_FADE_PRINCIPAL"
SERVICE_NAME = "recserve.v1.FadingControl"


class AuthError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def load_tokens(tokens_file: str | Path | None = None) -> dict[str, str]:
    """token -> principal, from a file of ``principal token`` lines and/or the environment."""
    tokens: dict[str, str] = {}
    if tokens_file is not None:
        for i, line in enumerate(Path(tokens_file).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.replace(":", " ", 1).split()
            if len(parts) != 2:
                raise ValueError(f"{tokens_file}:{i}: expected 'principal token', got {line!r}")
            principal, token = parts
            tokens[token] = principal
    if os.environ.get(ENV_TOKEN):
        tokens[os.environ[ENV_TOKEN]] = os.environ.get(ENV_PRINCIPAL, "operator")
    return tokens


def authenticate(metadata, tokens: Mapping[str, str]) -> str:
    """The principal of the call's bearer token, or AuthError with the right code."""
    header = next((v for k, v in metadata or () if k.lower() == "authorization"), None)
    if header is None:
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata")
    scheme, _, token = str(header).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <token>'")
    token = token.strip().encode()
    principal = None
    for known, who in tokens.items():  # constant time per comparison, no early exit
        if hmac.compare_digest(known.encode(), token):
            principal = who
    if principal is None:
        raise AuthError(grpc.StatusCode.PERMISSION_DENIED, "token not accepted by this FadingControl server")
    return principal


def _status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, AuthError):
        return e.code, str(e)
    if isinstance(e, TransitionError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    if isinstance(e, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(e.args[0])
    if isinstance(e, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"


def _require(model: str, feature: str) -> None:
    if not model:
        raise ValueError("model: required")
    if not feature:
        raise ValueError("feature: required")


class FadingControlServicer(fading_pb2_grpc.FadingControlServicer):
    def __init__(self, store: FadingStore, tokens: Mapping[str, str], *, clock=time.time):
        if not tokens:
            raise ValueError("tokens: a FadingControl server needs at least one token")
        self.store = store
        self.tokens = dict(tokens)
        self.clock = clock

    async def _change(self, request, context, action: str, change) -> fading_pb2.FeatureFadeStatus:
        try:
            who = authenticate(context.invocation_metadata(), self.tokens)
            _require(request.model, request.feature)
            now = self.clock()
            new = await asyncio.to_thread(
                self.store.transition, request.model, request.feature, lambda s: change(s, now),
                action=action, actor=who, peer=context.peer() or "", reason=request.reason, now=now,
            )
            return state_to_proto(new, [], now)
        except Exception as e:  # noqa: BLE001  the edge: every error leaves with its code
            await context.abort(*_status_of(e))

    async def StartSchedule(self, request, context):
        def change(s: FeatureState, now: float) -> FeatureState:
            schedule = schedule_from_proto(request.steps)
            if schedule is None:
                raise ValueError("steps: at least one step is required")
            return sched.start(
                s, schedule, now,
                thresholds=thresholds_from_proto(request.thresholds),
                control_fraction=request.control_fraction if request.HasField("control_fraction") else None,
                salt=request.salt if request.HasField("salt") else None,
            )

        return await self._change(request, context, "start", change)

    async def Pause(self, request, context):
        return await self._change(request, context, "pause", sched.pause)

    async def Resume(self, request, context):
        return await self._change(request, context, "resume", sched.resume)

    async def Rollback(self, request, context):
        return await self._change(request, context, "rollback", sched.rollback)

    async def SetCoverage(self, request, context):
        return await self._change(
            request, context, "set_coverage", lambda s, now: sched.set_coverage(s, request.coverage, now)
        )

    async def Status(self, request, context):
        try:
            authenticate(context.invocation_metadata(), self.tokens)
            now = self.clock()
            states = await asyncio.to_thread(self.store.states, request.model or None)
            if request.feature:
                states = [s for s in states if s.feature == request.feature]
                if not states:
                    raise NotFound(f"no fading state for feature {request.feature!r}")
            figures = await asyncio.to_thread(self.store.guardrail_figures, request.model or None)
            out = fading_pb2.StatusResponse()
            for s in states:
                mine = [
                    (rep, at, fig)
                    for rep, m, f, at, fig in figures
                    if m == s.model and f == s.feature and fig["coverage"] == s.coverage
                ]
                out.features.append(state_to_proto(s, mine, now))
            return out
        except Exception as e:  # noqa: BLE001
            await context.abort(*_status_of(e))

    async def Audit(self, request, context):
        try:
            authenticate(context.invocation_metadata(), self.tokens)
            entries = await asyncio.to_thread(self.store.audit, request.model or None, limit=request.limit or 100)
            out = fading_pb2.AuditResponse()
            for e in entries:
                out.entries.append(
                    fading_pb2.AuditEntry(
                        id=e.id, at=e.at, actor=e.actor, peer=e.peer, model=e.model, feature=e.feature,
                        action=e.action,
                        from_coverage=e.from_state.get("coverage", math.nan), from_status=e.from_state.get("status", ""),
                        to_coverage=e.to_state["coverage"], to_status=e.to_state["status"], reason=e.reason,
                    )
                )
            return out
        except Exception as e:  # noqa: BLE001
            await context.abort(*_status_of(e))


def advance_due(store: FadingStore, now: float, *, actor: str = "scheduler:control") -> list[FeatureState]:
    """Advance every running schedule whose step has soaked; returns the changed states."""
    changed = []
    for s in store.states():
        if s.status == Status.RUNNING and s.soak_left(now) <= 0:
            new = store.transition(s.model, s.feature, lambda x: sched.tick(x, now), action="advance", actor=actor, now=now)
            if new != s:
                changed.append(new)
    return changed


async def _scheduler(store: FadingStore, interval_s: float, clock) -> None:
    while True:
        try:
            await asyncio.to_thread(advance_due, store, clock())
        except Exception as e:  # noqa: BLE001  keep the control plane up; retry next round
            print(f"fading scheduler: {e}", flush=True)
        await asyncio.sleep(interval_s)


async def create_server(
    store: FadingStore,
    *,
    tokens: Mapping[str, str],
    port: int = 0,
    host: str = "127.0.0.1",
    tick_interval_s: float = 1.0,
    clock=time.time,
) -> tuple[grpc.aio.Server, int]:
    """Bind ``host:port`` (0 = any free port), start; returns (server, port)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])  # a taken port fails to bind, never shared
    fading_pb2_grpc.add_FadingControlServicer_to_server(FadingControlServicer(store, tokens, clock=clock), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    if tick_interval_s > 0:
        task = asyncio.create_task(_scheduler(store, tick_interval_s, clock))
        server._recserve_scheduler = task  # keep a reference; cancelled with the loop
    return server, bound


class ControlThread(ServerThread):
    """A FadingControl server on its own event loop in a background thread (sync callers)."""

    def __init__(self, store: FadingStore, **kwargs):
        super().__init__(lambda: create_server(store, **kwargs), name="recserve-fading-control", grace_s=0.2)
        self.store = store


async def serve_forever(store: FadingStore, *, tokens: Mapping[str, str], port: int, host: str = "127.0.0.1") -> None:
    server, bound = await create_server(store, tokens=tokens, port=port, host=host)
    print(f"recserve FadingControl listening on {host}:{bound} (store {store.path}, {len(tokens)} token(s))", flush=True)
    await serve_until_signalled(server, grace_s=1.0, name="recserve FadingControl")
