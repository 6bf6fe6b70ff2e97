"""The Python client needs only grpcio, protobuf and numpy: a caller without torch (or Ray,
pydantic, pyarrow) ranks against a real server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from recserve.synth import TrafficGenerator
from serving.standalone.monolith import MonolithThread

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter where importing any heavy package fails, as on a machine that
# has only the client's three dependencies installed.
CALLER = """
import sys
BLOCKED = {"torch", "ray", "pydantic", "pyarrow", "pandas", "triton", "torchrec", "safetensors"}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is blocked: the client must not need it", name=name)
        return None

sys.meta_path.insert(0, Blocker())
import numpy as np
from serving.api.client import RankingClient

address, request_file, out_file = sys.argv[1:]
req = np.load(request_file)
sparse = {name[len("values_"):]: (req[name], req["lengths_" + name[len("values_"):]])
          for name in req.files if name.startswith("values_")}
with RankingClient(address) as client:
    info, health = client.model_info(), client.health_check()
    scores = client.predict(req["dense"], sparse, timeout=30)
np.save(out_file, scores)
print(info.model, health)
"""


def test_the_client_ranks_without_torch_installed(tiny_packages, tiny, reference, tmp_path):
    batch = TrafficGenerator(tiny, seed=5).batch(8)
    arrays = {"dense": batch.dense}
    for name, bags in batch.sparse.items():
        arrays[f"values_{name}"], arrays[f"lengths_{name}"] = bags.values, bags.lengths
    np.savez(tmp_path / "request.npz", **arrays)
    with MonolithThread(tiny_packages("singular-1")) as server:
        run = subprocess.run(
            [sys.executable, "-c", CALLER, f"127.0.0.1:{server.port}", str(tmp_path / "request.npz"),
             str(tmp_path / "scores.npy")],
            capture_output=True, text=True, timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT)},
        )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [tiny.name, "SERVING"]
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), reference(batch), rtol=1e-4, atol=1e-5)
