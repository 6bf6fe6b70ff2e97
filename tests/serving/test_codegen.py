"""The generated protobuf code in recserve/v1/ is what protos/generate.py makes now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("protos_generate", ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_not_stale(tmp_path):
    gen = _generator()
    fresh = {p.name: p.read_bytes() for p in gen.generate(tmp_path)}
    committed_dir = ROOT / "recserve" / "v1"
    committed = {p.name: p.read_bytes() for p in committed_dir.iterdir() if p.suffix in (".py", ".pyi")}
    assert sorted(fresh) == sorted(committed), "run `python protos/generate.py` (make proto) and commit recserve/v1/"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"recserve/v1/{stale} differ from protos/: run `python protos/generate.py` and commit"


def test_every_proto_in_the_api_folder_is_compiled():
    gen = _generator()
    protos = {Path(p).stem for p in gen.proto_files()}
    assert "ranker" in protos
    for stem in protos:
        assert (ROOT / "recserve" / "v1" / f"{stem}_pb2.py").is_file()
