"""Put this folder first on PYTHONPATH and every Python process started with it (a CLI, a
server, each Ray worker) runs this at start-up as ``sitecustomize``: any import of torchrec
then fails, and is recorded. Used by the tests that prove serving, the bench and random
export need no torchrec (a GPU host has none).

$RECSERVE_NO_TORCHREC_LOG, when set, gets one line per process that loaded this guard
("guard PID ARGV") and one per blocked import ("torchrec PID ARGV: import NAME").
"""

import importlib.abc
import os
import sys

_LOG = os.environ.get("RECSERVE_NO_TORCHREC_LOG")


def _record(text: str) -> None:
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(f"{text} {os.getpid()} {' '.join(sys.argv)[:300]}\n")


class _NoTorchrec(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchrec" or name.startswith("torchrec."):
            _record(f"torchrec import {name}:")
            raise ImportError(f"torchrec is blocked in this process (tests/no_torchrec): import {name}")
        return None


sys.meta_path.insert(0, _NoTorchrec())
_record("guard")
