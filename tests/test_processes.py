"""Real worker processes: one copy of the weights, owned processes, recovery from SIGKILL
(more on lost workers in test_recovery.py). The phase priority's niceness and the supervisor's
restart rate as logic first (a test clock, workers without processes), then in real workers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from splitwiser import ConfigError, EngineConfig, SamplingParams, SplitwiserPipeline
from splitwiser.roles import ROLES
from splitwiser.runtime import spawn
from splitwiser.runtime.supervisor import Supervisor
from tests.conftest import build_model_dir, hf_greedy


def _worker_pid(pipe: SplitwiserPipeline, name: str) -> int:
    return pipe.workers()[name]["pid"]


def test_workers_map_the_weights_instead_of_copying(tmp_path, leftovers):
    # ~80 MB of float32 weights: a private copy would dwarf the interpreter's own growth
    path = build_model_dir(tmp_path, "llama", hidden=512, layers=4, vocab_size=16384)
    weight_bytes = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert weight_bytes > 60e6
    with SplitwiserPipeline(path, num_prompt_workers=1, num_token_workers=1, device="cpu") as pipe:
        info = pipe.workers()
        assert sorted(info) == ["splitwiser-prompt-0", "splitwiser-token-0"]
        for name, ready in info.items():
            assert ready["num_params_shared"] == ready["num_params"] > 0
            growth = ready["uss_after_weights"] - ready["uss_before_weights"]
            assert growth < 0.2 * weight_bytes, (
                f"{name} grew {growth / 1e6:.0f} MB of private memory"
            )
            # and now, with the model in use, the private memory is still far below a copy
            # (besides the heap a CPU prompt worker faults in for its prefill temporaries)
            uss = psutil.Process(ready["pid"]).memory_full_info().uss
            private = uss - ready["uss_before_weights"] - ready["heap_reserved"]
            assert private < 0.5 * weight_bytes
            assert (ready["heap_reserved"] > 0) == name.startswith("splitwiser-prompt")
            assert psutil.Process(ready["pid"]).name().startswith("sw-")
        pipe.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))
    leftovers.assert_clean()


def test_cpu_workers_fork_from_a_preloaded_server_as_if_spawned(
    model_dirs, reference_models, leftovers, monkeypatch, tmp_path
):
    """CPU workers fork from the fork server (torch and the worker's code imported once), yet
    run as a spawned child would: with the environment and stderr the pipeline has when it
    starts them, not those of when the server started. The spawn method is one variable away;
    both give generate()'s tokens."""
    prompt = [5, 9, 200, 31, 7]
    expected = hf_greedy(reference_models["llama"], prompt, 6)
    params = SamplingParams(max_new_tokens=6)

    def run() -> list[dict]:
        """Each worker as it runs: its parent, its CUDA_MPS_* variables, its stderr."""
        with SplitwiserPipeline(model_dirs["llama"], num_prompt_workers=1, num_token_workers=1,
                                device="cpu") as pipe:  # fmt: skip
            assert pipe.generate([prompt], params)[0].token_ids == expected
            seen = []
            for ready in pipe.workers().values():
                stderr = os.stat(f"/proc/{ready['pid']}/fd/2")
                seen.append(dict(ppid=psutil.Process(ready["pid"]).ppid(), mps_env=ready["mps_env"],
                                 stderr=(stderr.st_dev, stderr.st_ino)))  # fmt: skip
            return seen

    mine = (os.fstat(2).st_dev, os.fstat(2).st_ino)  # pytest's capture of this test
    saved = os.dup(2)
    try:  # the server runs from here on, if it did not already, with another stderr
        with open(tmp_path / "stderr", "w") as other:
            os.dup2(other.fileno(), 2)
        run()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    server = spawn.forkserver_pid()
    assert server is not None and psutil.pid_exists(server)
    monkeypatch.setenv("CUDA_MPS_LOG_DIRECTORY", "/set/after/the/server/started")
    late = {"CUDA_MPS_LOG_DIRECTORY": "/set/after/the/server/started"}
    assert run() == [dict(ppid=server, mps_env=late, stderr=mine)] * 2
    monkeypatch.setenv("SPLITWISER_WORKER_MULTIPROC_METHOD", "spawn")
    assert run() == [dict(ppid=os.getpid(), mps_env=late, stderr=mine)] * 2
    monkeypatch.setenv("SPLITWISER_WORKER_MULTIPROC_METHOD", "fork")
    with pytest.raises(ConfigError, match="SPLITWISER_WORKER_MULTIPROC_METHOD"):
        run()
    leftovers.assert_clean()


def test_close_leaves_nothing_behind(model_dirs, leftovers):
    pipe = SplitwiserPipeline(
        model_dirs["llama"], num_prompt_workers=2, num_token_workers=2, device="cpu"
    )
    pids = [r["pid"] for r in pipe.workers().values()]
    assert len(pids) == 4 and all(psutil.pid_exists(p) for p in pids)
    pipe.generate([[1, 2, 3]] * 4, SamplingParams(max_new_tokens=3))
    pipe.close()
    pipe.close()  # idempotent
    assert not any(psutil.pid_exists(p) for p in pids)
    leftovers.assert_clean()


def test_exception_inside_with_cleans_up(model_dirs, leftovers):
    with pytest.raises(KeyError):
        with SplitwiserPipeline(model_dirs["qwen2"], device="cpu") as pipe:
            pipe.submit([4, 5, 6], SamplingParams(max_new_tokens=200, ignore_eos=True))
            raise KeyError("user code failed")
    leftovers.assert_clean()


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def test_killed_prompt_worker_requests_finish_on_a_restarted_worker(
    model_dirs, reference_models, leftovers
):
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 1000) for _ in range(120)] for _ in range(24)]
    refs = [hf_greedy(reference_models["opt"], p, 6) for p in prompts]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    with SplitwiserPipeline(model_dirs["opt"], device="cpu", max_prefill_tokens=240) as pipe:
        handles = [pipe.submit(p, params) for p in prompts]
        _kill(_worker_pid(pipe, "splitwiser-prompt-0"))  # mid-run: batches are queued
        outs = [h.result(timeout=120) for h in handles]
        assert pipe.stats()["restarts"]["prompt"] == 1
        assert pipe.stats()["num_retried"] > 0  # the killed worker's batches ran again
        assert [o.token_ids for o in outs] == refs
        assert pipe.stats()["num_free_blocks"] == pipe.num_kv_blocks
    leftovers.assert_clean()


_ORPHAN_SCRIPT = """
import json, sys
from splitwiser import SplitwiserPipeline
pipe = SplitwiserPipeline(sys.argv[1], device="cpu")
print(json.dumps([w["pid"] for w in pipe.workers().values()]), flush=True)
sys.stdin.read()  # wait to be killed
"""


def test_workers_exit_when_the_parent_is_killed(model_dirs):
    proc = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_SCRIPT, model_dirs["llama"]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pids = json.loads(proc.stdout.readline())
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(
        [psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10
    )
    assert alive == [], "workers outlived their killed parent"


def test_no_worker_outlives_its_pipeline():
    # runs last in this module: every pipeline above is closed, so no worker may remain
    names = [p.name() for p in psutil.Process().children(recursive=True)]
    assert not [n for n in names if n.startswith("sw-")]


def test_a_worker_killed_while_its_pipe_is_full_blocks_nothing(model_dirs, leftovers):
    # a stopped worker reads nothing: the parent's writer blocks on a full pipe, and must come
    # free (and leave no channel behind) once the worker is killed
    pipe = SplitwiserPipeline(model_dirs["llama"], device="cpu")
    prompt = pipe._engine.workers[("prompt", 0)]
    os.kill(prompt.process.pid, signal.SIGSTOP)
    for _ in range(8):
        prompt.send(b"x" * (1 << 20))
    time.sleep(0.5)
    assert prompt._feeder.is_alive()  # stuck in a write the worker never reads
    _kill(prompt.process.pid)
    t0 = time.monotonic()
    pipe.close()
    assert time.monotonic() - t0 < 10
    assert not prompt._feeder.is_alive()
    leftovers.assert_clean()


def test_a_restarted_worker_that_never_gets_ready_is_replaced(
    model_dirs, reference_models, leftovers
):
    with SplitwiserPipeline(model_dirs["llama"], device="cpu", worker_start_timeout_s=8) as pipe:
        first = pipe._engine.workers[("token", 0)]
        _kill(first.process.pid)
        deadline = time.monotonic() + 10
        while pipe._engine.workers.get(("token", 0), first) is first:
            assert time.monotonic() < deadline, "no restart"
            time.sleep(0.01)
        os.kill(pipe._engine.workers[("token", 0)].process.pid, signal.SIGSTOP)  # hangs at start
        handle = pipe.submit([7, 8, 9], SamplingParams(max_new_tokens=3))
        out = handle.result(timeout=60)  # served by the replacement of the replacement
        assert out.token_ids == hf_greedy(reference_models["llama"], [7, 8, 9], 3)
        assert pipe.stats()["restarts"]["token"] == 2
    leftovers.assert_clean()


def _exit_0_if_sigint_blocked() -> None:  # runs in a spawned child
    os._exit(0 if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set()) else 1)


SPAWN_HELD = """
from splitwiser.runtime import spawn
from tests.test_processes import _exit_0_if_sigint_blocked
if __name__ == "__main__":
    with spawn.sigint_held():  # the first start of a fresh interpreter
        p = spawn.worker_context("cpu").Process(target=_exit_0_if_sigint_blocked)
        p.start()
    p.join()
    raise SystemExit(p.exitcode)
"""


def test_a_worker_starts_with_ctrl_c_held_even_as_the_first_spawn(tmp_path):
    """Until worker_main ignores it, a Ctrl-C must wait: a child that dies of it while Python
    starts prints a fatal error. The resource tracker started by that first spawn must not
    lift the hold."""
    script = tmp_path / "spawn_held.py"
    script.write_text(SPAWN_HELD)
    root = str(Path(__file__).parents[1])
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=root, env=dict(os.environ, PYTHONPATH=root))  # fmt: skip
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "priority, yielding", [("prefill", "token"), ("equal", None), ("decode", "prompt")]
)
def test_phase_priority_decides_whose_workers_yield(priority, yielding):
    """On the CPU the phase that yields runs its workers at niceness 19 (the OS favours the
    other where they share cores); on CUDA the kernels are not the OS's to schedule. The niceness
    is all that the priority changes (``worker_nice`` is its only reader), so the output cannot
    depend on it."""
    engine = EngineConfig(phase_priority=priority)
    assert set(ROLES) == {"prompt", "token", "colocated"}
    for role, spec in ROLES.items():  # what worker_main passes to os.nice, per role
        want = 19 if role == yielding else 0
        assert engine.worker_nice(spec.phase, torch.device("cpu")) == want, role
        assert engine.worker_nice(spec.phase, torch.device("cuda:0")) == 0, role


def test_phase_priority_sets_the_yielding_workers_niceness(model_dirs, reference_models, leftovers):
    """In real workers (the default priority, prefill: the token workers yield), a replaced one
    included; the output is the same as ``generate()``'s."""
    base = psutil.Process().nice()
    yielding = min(19, base + 19)
    prompt = [5, 9, 200, 31, 7]
    with SplitwiserPipeline(model_dirs["llama"], device="cpu", phase_priority="prefill") as pipe:
        for name, info in pipe.workers().items():
            want = yielding if "-token-" in name else base
            assert psutil.Process(info["pid"]).nice() == want, name
        out = pipe.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))
        assert out[0].token_ids == hf_greedy(reference_models["llama"], prompt, 8)
        _kill(_worker_pid(pipe, "splitwiser-token-0"))  # a replaced worker yields too
        deadline = time.monotonic() + 60
        while pipe.stats()["restarts"]["token"] < 1 or "splitwiser-token-0" not in pipe.workers():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert psutil.Process(_worker_pid(pipe, "splitwiser-token-0")).nice() == yielding
    leftovers.assert_clean()


@pytest.mark.parametrize("fill, workers", [(16, {("token", 0)}), (0, {("token", 0), ("token", 1)})])
def test_decoding_requests_fill_one_token_worker_first(
    fill, workers, model_dirs, reference_models, leftovers
):
    """With ``decode_fill_seqs`` at 16 six requests decode in token worker 0's batch and worker 1
    runs no step; at 0 they are spread. Tokens equal ``generate()``'s either way."""
    prompts = [[5, 9, 200 + i, 31, 7] for i in range(6)]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    with SplitwiserPipeline(
        model_dirs["llama"], device="cpu", num_token_workers=2, decode_fill_seqs=fill
    ) as pipe:
        outs = pipe.generate(prompts, params)
        steps = [r for r in pipe.phase_log() if r.kind == "decode"]
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(reference_models["llama"], prompt, 24)
    assert {r.worker for r in steps} == workers
    if fill:
        assert max(r.num_tokens for r in steps) == 6  # every request in one step
    leftovers.assert_clean()


def test_phase_priority_must_be_known():
    with pytest.raises(ConfigError, match="phase_priority must be one of prefill, equal, decode"):
        SplitwiserPipeline(device="cpu", phase_priority="tokens")


# ------------------------------------------------------------ the restart rate, on a test clock


class _Clock:
    """Seconds that move only when a test moves them."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class _Worker:
    """The supervisor's view of a worker process, without one: alive and ready until told."""

    def __init__(self, role: str, index: int):
        self.cfg = SimpleNamespace(role=role, index=index)
        self.ready: object | None = None  # set at its ReadyMsg
        self.alive = True
        self.process = SimpleNamespace(exitcode=-9)

    def is_alive(self) -> bool:
        return self.alive

    def age_s(self) -> float:
        return 0.0

    silent_s = age_s

    def stop(self, timeout_s: float) -> None:
        self.alive = False


def _supervisor(num_token_workers: int = 1, **options) -> tuple[Supervisor, _Clock]:
    clock = _Clock()
    config = EngineConfig(num_prompt_workers=1, num_token_workers=num_token_workers, **options)
    supervisor = Supervisor(config, _Worker, clock=clock)
    supervisor.start_all()
    _ready(supervisor)
    return supervisor, clock


def _ready(supervisor: Supervisor) -> None:
    for worker in supervisor.workers.values():
        worker.ready = worker.ready or object()


def _crash(supervisor: Supervisor, key: tuple[str, int]) -> None:
    """SIGKILL as the engine thread handles it: found lost, removed, its slot replaced."""
    worker = supervisor.workers[key]
    worker.alive = False
    (lost,) = supervisor.find_lost(busy=set())
    assert lost.worker is worker and lost.reason == "died (exit code -9)"
    supervisor.remove(worker)
    supervisor.replace(*key)


def test_restarts_are_a_rate_not_a_lifetime_budget():
    """One restart per 2 s: three deaths, each after the window of the restart before, are all
    restarted at once."""
    supervisor, clock = _supervisor(max_worker_restarts=1, worker_restart_window_s=2)
    for _ in range(3):
        first = supervisor.workers[("token", 0)]
        _crash(supervisor, ("token", 0))
        assert supervisor.workers[("token", 0)] is not first  # restarted at once
        assert supervisor.health()["token"]["starting"] == 1
        _ready(supervisor)
        clock.now_s += 2.5
    assert supervisor.stopped_role() is None
    assert supervisor.health()["token"] == {
        "configured": 1, "ready": 1, "starting": 0, "vacant": 0,
        "restarts": 3, "restarts_in_window": 0,
    }  # fmt: skip
    assert supervisor.restarts == {"prompt": 0, "token": 3}


def test_a_restart_past_the_rate_waits_for_the_window():
    """The second death within the window leaves the slot vacant; with the role's only worker
    gone the role has stopped (the engine fails the pipeline); once the window has passed the
    next refill restarts it. Restarts older than the window no longer count, at any edge."""
    supervisor, clock = _supervisor(max_worker_restarts=1, worker_restart_window_s=600)
    _crash(supervisor, ("token", 0))
    _ready(supervisor)
    clock.now_s += 1
    _crash(supervisor, ("token", 0))  # past the rate
    assert ("token", 0) not in supervisor.workers and supervisor.vacant == {("token", 0)}
    assert supervisor.stopped_role() == "token"
    assert supervisor.health()["token"] == {
        "configured": 1, "ready": 0, "starting": 0, "vacant": 1,
        "restarts": 1, "restarts_in_window": 1,
    }  # fmt: skip
    clock.now_s += 599  # exactly one window after the first restart: it still counts
    supervisor.refill()
    assert supervisor.vacant == {("token", 0)}
    clock.now_s += 0.001
    supervisor.refill()
    assert supervisor.vacant == set() and ("token", 0) in supervisor.workers
    assert supervisor.stopped_role() is None
    assert supervisor.health()["token"]["restarts"] == 2
    assert supervisor.health()["token"]["restarts_in_window"] == 1


def test_a_role_with_a_worker_left_has_not_stopped():
    """Per role, not per slot: a second token worker lost within the window waits vacant while
    the first still serves; the prompt role's rate is its own."""
    supervisor, clock = _supervisor(
        num_token_workers=2, max_worker_restarts=1, worker_restart_window_s=60
    )
    _crash(supervisor, ("token", 0))
    _ready(supervisor)
    clock.now_s += 1
    _crash(supervisor, ("token", 1))
    assert supervisor.vacant == {("token", 1)} and supervisor.stopped_role() is None
    _crash(supervisor, ("prompt", 0))  # the prompt role has spent nothing yet
    assert ("prompt", 0) in supervisor.workers
    assert supervisor.health()["token"]["vacant"] == 1
    assert supervisor.restarts == {"prompt": 1, "token": 1}


def _minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def test_prompt_workers_fault_their_prefill_memory_in_at_start_up(leftovers):
    """A CPU prompt worker reserves its prefill temporaries before it reports ready: its first
    full batch (one prompt of 4,000 tokens on the embedded model) faults in little more than
    the pool pages its K/V go to (2,000 here), not the ~25,000 pages of a heap growing under it."""
    prompt = [(7 * j) % 1000 + 1 for j in range(4000)]
    with SplitwiserPipeline(None, device="cpu", kv_cache_bytes=64 << 20) as pipe:
        pid = _worker_pid(pipe, "splitwiser-prompt-0")
        before = _minor_faults(pid)
        pipe.generate([prompt], SamplingParams(max_new_tokens=1))
        assert _minor_faults(pid) - before < 6000
    leftovers.assert_clean()
