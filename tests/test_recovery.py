"""Nothing lost, nothing stuck, nothing held: real worker processes, really sent SIGKILL,
SIGSTOP and SIGTERM. A lost token worker's requests resume with the tokens they would have had;
a hung worker is noticed; restarts are a rate; close() and every exit release everything."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from splitwiser import SamplingParams, SplitwiserPipeline, WorkerCrashedError
from splitwiser.core.request import seed_for_offset
from splitwiser.sampling import token_generator
from tests.conftest import build_model_dir, hf_greedy

ROOT = str(Path(__file__).parents[1])


def _pid(pipe: SplitwiserPipeline, name: str) -> int:
    return pipe.workers()[name]["pid"]


def _wait_for(predicate, timeout_s: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _shm_fds() -> int:
    """File descriptors of this process open on shared memory (torch's CPU storages)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "/dev/shm/" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


def _shm_mapped_bytes() -> int:
    total = 0
    with open("/proc/self/maps") as f:
        for line in f:
            if "/dev/shm/" in line:
                lo, hi = line.split()[0].split("-")
                total += int(hi, 16) - int(lo, 16)
    return total


def test_a_shifted_seed_draws_the_later_tokens():
    p = SamplingParams(temperature=1.0)
    for seed in (0, 7, 2**62 + 11, -5):
        for offset in (0, 1, 9, 250):
            for i in (0, 1, 5):
                shifted = token_generator(p, seed_for_offset(seed, offset), i, "cpu")
                assert (
                    shifted.initial_seed()
                    == token_generator(p, seed, i + offset, "cpu").initial_seed()
                )


# ---------------------------------------------------------------- 1. token worker death: resume


def test_killed_token_worker_requests_resume_with_the_same_tokens(
    model_dirs, reference_models, leftovers
):
    rng = random.Random(1)
    prompts = [[rng.randrange(1, 1000) for _ in range(n)] for n in (5, 17, 33, 8)]
    greedy = SamplingParams(max_new_tokens=200, ignore_eos=True)
    seeded = SamplingParams(max_new_tokens=200, temperature=1.0, top_k=50, seed=77, ignore_eos=True)
    refs = [hf_greedy(reference_models["llama"], p, 200) for p in prompts]
    with SplitwiserPipeline(model_dirs["llama"], device="cpu") as pipe:
        seeded_ref = pipe.generate([prompts[0]], seeded)[0].token_ids
        handles = [pipe.submit(p, greedy) for p in prompts] + [pipe.submit(prompts[0], seeded)]
        streams = [[] for _ in handles]
        readers = [
            threading.Thread(target=lambda h=h, s=s: s.extend(h.stream(timeout=120)))
            for h, s in zip(handles, streams)
        ]
        for t in readers:
            t.start()
        _wait_for(lambda: all(len(s) >= 3 for s in streams), what="decoding to start")
        at_kill = [len(s) for s in streams]
        os.kill(_pid(pipe, "splitwiser-token-0"), signal.SIGKILL)
        outs = [h.result(timeout=120) for h in handles]
        for t in readers:
            t.join(timeout=120)
        assert [o.token_ids for o in outs[:4]] == refs  # greedy: exactly generate()'s tokens
        assert outs[4].token_ids == seeded_ref  # seeded sampling: the same draws
        assert streams == [o.token_ids for o in outs]  # streamed once each, none repeated
        stats = pipe.stats()
        assert stats["restarts"]["token"] == 1 and stats["num_retried"] >= 1
        assert all(3 <= n < 200 for n in at_kill)  # every request died mid-decode
        assert stats["num_free_blocks"] == pipe.num_kv_blocks
    leftovers.assert_clean()


def test_requests_fail_once_their_retry_budget_is_spent(model_dirs, reference_models, leftovers):
    long = SamplingParams(max_new_tokens=240, ignore_eos=True)
    with SplitwiserPipeline(model_dirs["llama"], device="cpu", max_request_retries=0) as pipe:
        handles = [pipe.submit([7, 8, 9, i + 1], long) for i in range(4)]
        next(iter(handles[0].stream(timeout=60)))  # decoding has started
        os.kill(_pid(pipe, "splitwiser-token-0"), signal.SIGKILL)
        t0 = time.monotonic()
        for h in handles:
            with pytest.raises(WorkerCrashedError, match="splitwiser-token-0 died .*retries"):
                h.result(timeout=10)
        assert time.monotonic() - t0 < 5
        out = pipe.generate([[7, 8, 9]], SamplingParams(max_new_tokens=3))[0]
        assert out.token_ids == hf_greedy(reference_models["llama"], [7, 8, 9], 3)
        assert pipe.stats()["num_free_blocks"] == pipe.num_kv_blocks
    leftovers.assert_clean()


# ---------------------------------------------------------------- 2. hung workers


def test_a_stopped_token_worker_is_killed_and_its_requests_resume(
    model_dirs, reference_models, leftovers
):
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    refs = [hf_greedy(reference_models["qwen2"], p, 200) for p in prompts]
    with SplitwiserPipeline(model_dirs["qwen2"], device="cpu", worker_liveness_timeout_s=4) as pipe:
        handles = [pipe.submit(p, params) for p in prompts]
        next(iter(handles[0].stream(timeout=60)))
        pid = _pid(pipe, "splitwiser-token-0")
        os.kill(pid, signal.SIGSTOP)  # as if deadlocked: alive, silent
        outs = [h.result(timeout=120) for h in handles]
        assert [o.token_ids for o in outs] == refs
        assert not psutil.pid_exists(pid)
        assert pipe.stats()["restarts"]["token"] == 1
    leftovers.assert_clean()


def test_a_stopped_prompt_worker_is_killed_and_its_prompts_rerun(
    model_dirs, reference_models, leftovers
):
    rng = random.Random(5)
    prompts = [[rng.randrange(1, 1000) for _ in range(60)] for _ in range(6)]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    refs = [hf_greedy(reference_models["opt"], p, 4) for p in prompts]
    with SplitwiserPipeline(
        model_dirs["opt"], device="cpu", worker_liveness_timeout_s=4, max_prefill_tokens=60
    ) as pipe:
        pid = _pid(pipe, "splitwiser-prompt-0")
        os.kill(pid, signal.SIGSTOP)
        outs = [h.result(timeout=120) for h in [pipe.submit(p, params) for p in prompts]]
        assert [o.token_ids for o in outs] == refs
        assert not psutil.pid_exists(pid)
        assert pipe.stats()["restarts"]["prompt"] == 1
    leftovers.assert_clean()


# ---------------------------------------------------------------- 3. restarts are a rate


def _replaced(pipe, name: str, old_pid: int) -> bool:
    info = pipe.workers().get(name)
    return info is not None and info["pid"] != old_pid


def test_restarts_are_a_rate_not_a_lifetime_budget(model_dirs, reference_models, leftovers):
    params = SamplingParams(max_new_tokens=3)
    ref = hf_greedy(reference_models["llama"], [7, 8, 9], 3)
    with SplitwiserPipeline(
        model_dirs["llama"], device="cpu", max_worker_restarts=1, worker_restart_window_s=2
    ) as pipe:
        for _ in range(3):  # three deaths, each after the window of the restart before
            pid = _pid(pipe, "splitwiser-token-0")
            os.kill(pid, signal.SIGKILL)
            _wait_for(lambda p=pid: _replaced(pipe, "splitwiser-token-0", p), what="restart")
            time.sleep(2.5)
            assert pipe.generate([[7, 8, 9]], params)[0].token_ids == ref
        stats = pipe.stats()
        assert stats["restarts"]["token"] == 3 and stats["health"] == "ok"
        assert stats["workers"]["token"] == {
            "configured": 1, "ready": 1, "starting": 0, "vacant": 0,
            "restarts": 3, "restarts_in_window": 0,
        }  # fmt: skip
    leftovers.assert_clean()


def test_a_crash_loop_stops_the_pipeline_with_a_clear_error(model_dirs, leftovers):
    with SplitwiserPipeline(
        model_dirs["llama"], device="cpu", max_worker_restarts=1, worker_restart_window_s=600
    ) as pipe:
        pid = _pid(pipe, "splitwiser-token-0")
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: _replaced(pipe, "splitwiser-token-0", pid), what="restart")
        assert pipe.stats()["health"] == "ok"
        os.kill(_pid(pipe, "splitwiser-token-0"), signal.SIGKILL)  # past the rate
        _wait_for(lambda: pipe.stats()["health"] == "failed", 30, "the pipeline to fail")
        assert "restart rate (1 per 600 s) is spent" in pipe.stats()["error"]
        with pytest.raises(WorkerCrashedError, match="restart rate"):
            pipe.submit([1, 2, 3])
    leftovers.assert_clean()


# ---------------------------------------------------------------- 4, 5. nothing held


def test_workers_killed_while_starting_leave_no_descriptor_and_close_unmaps_everything(
    model_dirs, reference_models, leftovers
):
    """Token workers killed while starting, long before they map anything, leave no
    descriptor; close() unmaps the pool and the weights (the pipeline object still
    referenced), and leaves nothing behind."""
    fds_before, mapped_before = _shm_fds(), _shm_mapped_bytes()
    pipe = SplitwiserPipeline(model_dirs["llama"], device="cpu", kv_cache_bytes=64 << 20)
    assert _shm_mapped_bytes() - mapped_before >= 64 << 20
    first = pipe._engine.workers[("token", 0)]
    os.kill(first.process.pid, signal.SIGKILL)
    for _ in range(2):  # each replacement killed at once, long before it maps anything
        _wait_for(lambda w=first: pipe._engine.workers.get(("token", 0)) not in (None, w), 30)
        first = pipe._engine.workers[("token", 0)]
        assert first.ready is None
        os.kill(first.process.pid, signal.SIGKILL)
    _wait_for(lambda: "splitwiser-token-0" in pipe.workers(), what="a ready worker")
    out = pipe.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))[0]
    assert out.token_ids == hf_greedy(reference_models["llama"], [1, 2, 3], 2)
    pipe.close()  # the pipeline object is still referenced here
    assert _shm_mapped_bytes() - mapped_before < 1 << 20
    assert _shm_fds() == fds_before
    assert pipe.stats()["health"] == "closed"
    leftovers.assert_clean()


# ---------------------------------------------------------------- 6. snapshots from any thread
# (checked while workers are replaced, in the test of all of it at once, at the end)


# ---------------------------------------------------------------- 7. signals and exits

_NO_CLOSE = """
import json, sys
from splitwiser import SamplingParams, SplitwiserPipeline
pipe = SplitwiserPipeline(sys.argv[1], device="cpu", num_prompt_workers=2, num_token_workers=2)
pipe.submit([1, 2, 3], SamplingParams(max_new_tokens=200, ignore_eos=True))  # still running
print(json.dumps([w["pid"] for w in pipe.workers().values()]), flush=True)
"""  # and exits without close()


def test_a_script_that_exits_without_close_stops_its_workers_quietly(model_dirs):
    proc = subprocess.run(
        [sys.executable, "-c", _NO_CLOSE, model_dirs["llama"]],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    pids = json.loads(proc.stdout)
    assert len(pids) == 4 and not any(psutil.pid_exists(p) for p in pids)


def _wait_for_workers(parent: psutil.Process, n: int) -> list[psutil.Process]:
    def ours():
        return [c for c in parent.children(recursive=True) if c.name().startswith("sw-")]

    _wait_for(lambda: len(ours()) == n, 120, "workers to start")
    return ours()


def test_sigterm_stops_the_workers_first_and_exits_143(tmp_path):
    # big enough that 32 prompts of 240 new tokens are still decoding when the signal comes
    path = build_model_dir(tmp_path, "llama", hidden=512, layers=4, vocab_size=16384)
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitwiser", "generate", "--model", path, "--max-new-tokens",
         "240", "--token-workers", "2", *["hello"] * 32],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        workers = _wait_for_workers(psutil.Process(proc.pid), 3)
        time.sleep(1.0)  # decoding
        proc.send_signal(signal.SIGTERM)  # the parent only, as `kill` does
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    # the workers were stopped before the parent exited, not left to notice its death
    assert not [w.pid for w in workers if w.is_running() and w.status() != "zombie"]
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "splitwiser: terminated"


# ---------------------------------------------------------------- all of it at once


def _killable(pipe) -> list[tuple[str, int]]:
    ready = pipe.workers()
    roles = [name.split("-")[1] for name in ready]
    return sorted((n, w["pid"]) for n, w in ready.items() if roles.count(n.split("-")[1]) == 2)


NUM_KILLS = 8


@pytest.mark.slow
def test_requests_through_random_sigkills_with_stats_read_from_another_thread(
    model_dirs, reference_models, leftovers
):
    """80 requests, 8 SIGKILLs of a random worker of each role in turn: every output is
    generate()'s, nothing is held afterwards. Meanwhile another thread reads workers() and
    stats() as a dashboard would: never an error, never an inconsistent snapshot."""
    rng = random.Random(12)
    num_requests = 10 * NUM_KILLS
    prompts = [[rng.randrange(1, 1000) for _ in range(rng.randrange(1, 48))]
               for _ in range(num_requests)]  # fmt: skip
    lengths = [rng.randrange(1, 24) for _ in prompts]
    refs = [hf_greedy(reference_models["llama"], p, n) for p, n in zip(prompts, lengths)]
    fds_before = _shm_fds()
    errors, polls, stop = [], [0], threading.Event()
    with SplitwiserPipeline(
        model_dirs["llama"], device="cpu", num_prompt_workers=2, num_token_workers=2,
        max_prefill_tokens=128,
    ) as pipe:  # fmt: skip

        def dashboard():
            while not stop.is_set():
                try:
                    workers, stats = pipe.workers(), pipe.stats()
                    assert len(workers) <= 4 and stats["num_free_blocks"] <= stats["num_kv_blocks"]
                    assert stats["health"] in ("ok", "degraded")
                    polls[0] += 1
                except Exception as exc:  # noqa: BLE001 - any error is the failure
                    errors.append(repr(exc))
                time.sleep(0.002)

        thread = threading.Thread(target=dashboard)
        thread.start()
        handles, killed = [], []
        try:
            for i, (prompt, n) in enumerate(zip(prompts, lengths)):
                handles.append(
                    pipe.submit(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
                )
                if i % 10 == 5:  # a kill every ~10 submissions, of a random worker of the
                    # role whose turn it is (prompt, token, prompt, ...), while that role keeps
                    # a ready worker: deaths at random, not a storm that leaves a role empty
                    # for seconds on end
                    # the last death noticed first: a worker killed but not yet noticed is
                    # still listed as ready, and must not be picked twice
                    _wait_for(
                        lambda: sum(pipe.stats()["restarts"].values()) == len(killed),
                        what="the previous kill to be noticed",
                    )
                    role = ("prompt", "token")[len(killed) % 2]

                    def of_role(role=role):
                        return [w for w in _killable(pipe) if w[0].split("-")[1] == role]

                    _wait_for(of_role, what=f"two ready {role} workers")
                    name, pid = rng.choice(of_role())
                    os.kill(pid, signal.SIGKILL)
                    killed.append(name)
                time.sleep(0.05)
            outs = [h.result(timeout=300) for h in handles]
        finally:
            stop.set()
            thread.join()
        assert len(killed) == NUM_KILLS
        mismatches = [i for i, (o, r) in enumerate(zip(outs, refs)) if o.token_ids != r]
        assert mismatches == [], f"{len(mismatches)} outputs differ from generate()"
        assert errors == [] and polls[0] > 100
        # the last death may be noticed after the last result (it may have owned nothing)
        _wait_for(
            lambda: sum(pipe.stats()["restarts"].values()) == NUM_KILLS, 30, "the last restart"
        )
        stats = pipe.stats()
        assert stats["restarts"] == {"prompt": NUM_KILLS // 2, "token": NUM_KILLS // 2}
        assert stats["num_free_blocks"] == pipe.num_kv_blocks and stats["num_unfinished"] == 0
        # a request counts as unfinished from the moment submit() returns
        long = SamplingParams(max_new_tokens=200, ignore_eos=True)
        handles = []
        for i in range(10):
            handles.append(pipe.submit([5, 6, i + 1], long))
            assert pipe.stats()["num_unfinished"] == i + 1
        for h in handles:
            h.cancel()
    assert _shm_fds() == fds_before
    leftovers.assert_clean()
