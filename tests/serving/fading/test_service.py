"""FadingControl over gRPC: bearer-token auth, every action, audit, restart, the CLI."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from recserve.cli import main as recserve_main
from serving.fading.client import FadingClient
from serving.fading.schedule import Schedule
from serving.fading.service import ControlThread, load_tokens
from serving.fading.store import FadingStore

TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}


@pytest.fixture
def control(tmp_path: Path):
    with ControlThread(FadingStore(tmp_path / "fading.sqlite"), tokens=TOKENS, tick_interval_s=0) as running:
        yield running


def addr(running: ControlThread) -> str:
    return f"127.0.0.1:{running.port}"


@pytest.mark.parametrize("call", ["status", "pause", "set_coverage", "audit"])
def test_calls_without_a_token_are_unauthenticated(control, call: str) -> None:
    with FadingClient(addr(control)) as c, pytest.raises(grpc.RpcError) as e:
        {"status": lambda: c.status(), "pause": lambda: c.pause("m", "f"),
         "set_coverage": lambda: c.set_coverage("m", "f", 0.5), "audit": lambda: c.audit()}[call]()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("call", ["status", "set_coverage"])
def test_calls_with_a_wrong_token_are_permission_denied(control, call: str) -> None:
    with FadingClient(addr(control), token="tok-mallory") as c, pytest.raises(grpc.RpcError) as e:
        c.status() if call == "status" else c.set_coverage("m", "f", 0.0)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_refused_call_changes_nothing(control) -> None:
    with FadingClient(addr(control), token="tok-mallory") as c, pytest.raises(grpc.RpcError):
        c.set_coverage("m", "f", 0.0)
    with FadingClient(addr(control), token="tok-alice") as c:
        assert list(c.status().features) == [] and list(c.audit().entries) == []


def test_an_operator_starts_pauses_resumes_rolls_back_and_sets_coverage(control) -> None:
    with FadingClient(addr(control), token="tok-alice") as c:
        s = c.start("m", "f", Schedule.parse("1,0.5,0", "1h"), control_fraction=0.1, reason="retire f")
        assert (s.status, s.coverage, s.step, s.control_fraction) == ("running", 1.0, 0, pytest.approx(0.1))
        assert c.pause("m", "f").status == "paused"
        assert c.resume("m", "f").status == "running"
        assert c.rollback("m", "f", reason="looks off").status == "rolled_back"
        s = c.set_coverage("m", "f", 0.25)
        assert (s.status, s.coverage) == ("manual", 0.25)
        (st,) = c.status("m").features
        assert st.coverage == 0.25
        entries = list(c.audit("m").entries)
    assert [e.action for e in entries] == ["start", "pause", "resume", "rollback", "set_coverage"]
    assert {e.actor for e in entries} == {"alice"}
    assert entries[0].reason == "retire f" and entries[3].reason == "looks off"
    assert entries[-1].from_coverage == 1.0 and entries[-1].to_coverage == 0.25
    assert all(e.peer for e in entries) and all(e.at > 0 for e in entries)


def test_bad_input_and_impossible_changes_get_precise_codes(control) -> None:
    with FadingClient(addr(control), token="tok-bob") as c:
        with pytest.raises(grpc.RpcError) as e:
            c.set_coverage("m", "f", 1.5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "coverage" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.pause("m", "")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "feature" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.resume("m", "f")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as e:
            c.status("m", "nope")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_state_survives_a_restart_of_the_control_plane(tmp_path: Path) -> None:
    path = tmp_path / "fading.sqlite"
    with ControlThread(FadingStore(path), tokens=TOKENS, tick_interval_s=0) as first:
        with FadingClient(addr(first), token="tok-alice") as c:
            c.start("m", "f", Schedule.parse("0.5,0", "1h"))
    with ControlThread(FadingStore(path), tokens=TOKENS, tick_interval_s=0) as second:
        with FadingClient(addr(second), token="tok-bob") as c:
            (st,) = c.status("m").features
            assert (st.status, st.coverage) == ("running", 0.5)
            assert c.pause("m", "f").status == "paused"


def test_the_cli_drives_the_control_plane(control, capsys, monkeypatch) -> None:
    monkeypatch.setenv("RECSERVE_FADE_TOKEN", "tok-alice")
    a = addr(control)
    assert recserve_main(["fade", "start", "m", "f", "--steps", "1,0.5,0", "--soak", "10m", "--addr", a]) == 0
    assert recserve_main(["fade", "set", "m", "g", "0.5", "--addr", a, "--reason", "try"]) == 0
    assert recserve_main(["fade", "status", "m", "--addr", a]) == 0
    out = capsys.readouterr().out
    assert "m/f: coverage 1 RUNNING step 0/2" in out and "m/g: coverage 0.5 MANUAL" in out
    assert recserve_main(["fade", "audit", "--addr", a]) == 0
    assert "alice" in capsys.readouterr().out
    assert recserve_main(["fade", "resume", "m", "f", "--addr", a]) == 1  # refused: it is running
    assert recserve_main(["fade", "start", "m", "h", "--steps", "0,1", "--addr", a]) == 2  # bad schedule
    assert recserve_main(["fade", "pause", "m", "f", "--addr", a, "--token", "wrong"]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err


def test_tokens_come_from_a_file_of_principal_token_lines(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("RECSERVE_FADE_TOKEN", raising=False)
    f = tmp_path / "tokens"
    f.write_text("# operators\nalice tok-a\nbob:tok-b\n")
    assert load_tokens(f) == {"tok-a": "alice", "tok-b": "bob"}
    f.write_text("just-a-token\n")
    with pytest.raises(ValueError, match="principal token"):
        load_tokens(f)


def test_reclaim_reads_the_state_through_the_control_plane(control, tiny_packages, capsys, monkeypatch) -> None:
    monkeypatch.setenv("RECSERVE_FADE_TOKEN", "tok-alice")
    a = addr(control)
    assert recserve_main(["fade", "start", "tiny", "category", "--steps", "0", "--soak", "0", "--addr", a]) == 0
    from serving.fading.service import advance_due

    advance_due(control.store, 1e12)  # the control plane's scheduler would do this within a second
    assert recserve_main(["fade", "reclaim", "--package", str(tiny_packages("table-4")), "--addr", a]) == 0
    out = capsys.readouterr().out
    assert "reclaimable features: category" in out and "tables dropped: t_cat" in out
