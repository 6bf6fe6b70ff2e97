"""The CI run's own guarantees (issue 17): a crash or a hang fails the run fast and names the
test. Each case runs a small suite in a pytest subprocess with the project's settings --
``make test``'s xdist flags (the Makefile's XDIST) and pyproject's timeout and faulthandler
settings, with the bounds shortened -- and the project's grouping (one "ray" group first).

Without ``--max-worker-restart=0`` the first case hangs under pytest-xdist 3.8.0: loadgroup's
``remove_node`` puts the dead worker's whole workload back in the queue, finished groups
included; a replacement worker is then given a finished group, which sends it no test, so no
report ever comes to schedule the rest, and both workers wait forever."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

CONFTEST = '''
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    ray = [i for i in items if i.nodeid.startswith("test_ray")]
    rest = [i for i in items if not i.nodeid.startswith("test_ray")]
    items[:] = ray + rest
    for i in ray:
        i.add_marker(pytest.mark.xdist_group("ray"))
    for i in rest:
        i.add_marker(pytest.mark.xdist_group(i.nodeid.split("::")[0]))
'''

OTHERS = '''
import time

def test_one():
    time.sleep(0.2)

def test_two():
    time.sleep(0.2)
'''


def run_suite(tmp_path: Path, files: dict[str, str], *, timeout_s: float, faulthandler_s: float,
              limit_s: float = 120.0) -> tuple[int, str, float]:
    """Run ``files`` (name -> test code) as ``make test`` would; (exit code, output, seconds)."""
    xdist = re.search(r"^XDIST := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert ini["faulthandler_exit_on_timeout"] and ini["faulthandler_timeout"] > ini["timeout"]
    (tmp_path / "pytest.ini").write_text(textwrap.dedent(f"""\
        [pytest]
        timeout = {timeout_s}
        timeout_method = {ini["timeout_method"]}
        faulthandler_timeout = {faulthandler_s}
        faulthandler_exit_on_timeout = true
        """))
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for other in ("test_a.py", "test_b.py", "test_c.py"):
        (tmp_path / other).write_text(OTHERS)
    for name, code in files.items():
        (tmp_path / name).write_text(textwrap.dedent(code))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", *xdist, "-p", "no:cacheprovider", "--rootdir",
                           str(tmp_path), "-c", str(tmp_path / "pytest.ini"), str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=limit_s)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def test_a_worker_that_dies_fails_its_test_by_name_and_ends_the_run(tmp_path):
    code, out, seconds = run_suite(tmp_path, {"test_ray.py": """
        import ctypes, time
        import pytest

        @pytest.mark.parametrize("i", range(6))
        def test_r(i):
            time.sleep(0.2)
            if i == 3:
                ctypes.string_at(0)  # a native crash: SIGSEGV
        """}, timeout_s=30, faulthandler_s=60)
    assert code == 1, out
    assert "crashed while running 'test_ray.py::test_r[3]'" in out, out
    assert "Segmentation fault" in out and "test_ray.py\", line 9 in test_r" in out, out  # faulthandler's stack
    assert seconds < 60, (seconds, out)


def test_a_hang_fails_that_test_with_the_stacks_and_the_run_goes_on(tmp_path):
    code, out, seconds = run_suite(tmp_path, {"test_ray.py": """
        import time

        def test_hangs():
            time.sleep(600)

        def test_after():
            pass
        """}, timeout_s=2, faulthandler_s=60)
    assert code == 1, out
    assert "FAILED test_ray.py::test_hangs - Failed: Timeout (>2.0s) from pytest-timeout" in out, out
    assert re.search(r"\b7 passed\b", out), out  # test_after and the other files' 6
    assert seconds < 60, (seconds, out)


def test_a_hang_the_signal_cannot_stop_is_dumped_and_fails_its_test_by_name(tmp_path):
    code, out, seconds = run_suite(tmp_path, {"test_ray.py": """
        import signal, time

        def test_stuck():
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # as if stuck in native code
            time.sleep(600)
        """}, timeout_s=2, faulthandler_s=4)
    assert code == 1, out
    assert "Timeout (0:00:04)!" in out and "in test_stuck" in out, out  # faulthandler's dump
    assert "crashed while running 'test_ray.py::test_stuck'" in out, out
    assert seconds < 60, (seconds, out)
