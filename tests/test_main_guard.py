"""A script that builds a pipeline without ``if __name__ == "__main__":`` fails with one error
naming the guard, raised once in the parent: each spawned child that re-runs the script exits
silently instead of printing multiprocessing's bootstrapping traceback."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).parents[1])
GUARD = 'if __name__ == "__main__":'

BARE_SPAWN = """
import os
from splitwiser.runtime import spawn

p = spawn.CTX.Process(target=os.getpid)
spawn.start(p)
p.join()
raise spawn.startup_error("child", p)
"""

SPLITWISER = """
from splitwiser import SplitwiserPipeline

pipe = SplitwiserPipeline(num_prompt_workers=1, num_token_workers=1, device="cpu")
print(pipe.generate([[1, 2, 3]])[0].token_ids)
pipe.close()
"""

VLLM = """
from splitwiser.vllm import VLLMParallelPipeline

pipe = VLLMParallelPipeline(device="cpu", enforce_eager=True)
pipe.close()
"""


def _run_unguarded(tmp_path, source: str, timeout_s: float) -> subprocess.CompletedProcess:
    assert GUARD not in source
    script = tmp_path / "unguarded.py"
    script.write_text(source)
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=timeout_s, cwd=tmp_path, env=env)  # fmt: skip


def _assert_one_guard_error(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode != 0
    assert proc.stderr.count(GUARD) == 1, proc.stderr[-3000:]
    assert "ConfigError" in proc.stderr
    assert "bootstrapping phase" not in proc.stderr
    assert proc.stderr.count("Traceback") == 1, proc.stderr[-3000:]


def test_a_bare_spawn_from_an_unguarded_script(tmp_path):
    _assert_one_guard_error(_run_unguarded(tmp_path, BARE_SPAWN, timeout_s=120))


def test_splitwiser_pipeline_in_an_unguarded_script(tmp_path):
    proc = _run_unguarded(tmp_path, SPLITWISER, timeout_s=300)
    _assert_one_guard_error(proc)
    assert "[" not in proc.stdout  # nothing was generated, in the parent or a child


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_pipeline_in_an_unguarded_script(tmp_path):
    _assert_one_guard_error(_run_unguarded(tmp_path, VLLM, timeout_s=300))
