"""Typed serving errors. Inside serving everything raises these; the gRPC edge turns them
into status codes in one place (serving/api/status.py). No grpc import here, so shards and the
tower can raise them in any process."""

from __future__ import annotations

import enum

QUOTE_LIMIT = 64  # characters of a caller-supplied string that an error message repeats


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of a caller-supplied string, cut to ``limit`` characters (+ '...'): a 100 KB
    feature name must not come back as a 100 KB status message (it would overflow the
    client's header limit and arrive as a different error)."""
    text = str(text)
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


class Code(enum.Enum):
    """The outcome classes of a request, named after the gRPC codes they map to."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class ServingError(Exception):
    """Base of every error a request can end with; ``code`` says which."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # picklable across Ray processes with its subclass fields
        return (_rebuild, (type(self), self.__dict__))


def _rebuild(cls: type, state: dict) -> ServingError:
    err = cls.__new__(cls)
    Exception.__init__(err, state.get("message", ""))
    err.__dict__.update(state)
    return err


class InvalidRequest(ServingError):
    """Bad input; ``field`` names it the way the caller wrote it (``sparse['item_id'].lengths``)."""

    code = Code.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ModelNotFound(ServingError):
    code = Code.NOT_FOUND


class Overloaded(ServingError):
    code = Code.RESOURCE_EXHAUSTED


class DoorRefused(Overloaded):
    """Refused by a server's door (serving/engine/door.py) before its handler ran."""


class DeadlineExceeded(ServingError):
    code = Code.DEADLINE_EXCEEDED


class ShardUnavailable(ServingError):
    """A shard (or the dense tower) could not answer: down, restarting or unreachable."""

    code = Code.UNAVAILABLE

    def __init__(self, component: str, detail: str = ""):
        super().__init__(f"{component} is unavailable" + (f": {detail}" if detail else ""))
        self.component = component
