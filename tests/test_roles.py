"""A new worker role is one module: an "echo" role defined here (its parent side, a scripted
in-process worker that answers each request with its own prompt tokens, and its ``RoleSpec``),
registered, and driven through ``EngineCore`` in one process, with no model and no process."""

from __future__ import annotations

import time
from collections import Counter, deque

import pytest

from splitwiser.config import EngineConfig
from splitwiser.core import messages as m
from splitwiser.core.engine_core import EngineCore, Send
from splitwiser.core.prompts import PromptChecker
from splitwiser.core.request import WorkerKey
from splitwiser.models.default import build_tokenizer
from splitwiser.roles import ROLES, RoleSpec, append_step, make_roles, register, requests_per_worker
from splitwiser.sampling import SamplingParams

ECHO = "echo"


class EchoRole:
    """The parent side: each ready worker takes whole requests (blocks reserved first), up to
    two at a time; its steps' tokens join the requests as any decoding role's do."""

    def schedule(self, core: EngineCore, ready: list[int]) -> list[Send]:
        loads = self.loads(core)
        sends: list[Send] = []
        for index in ready:
            while loads[index] < 2:
                req = core.admit_next()
                if req is None:
                    return sends
                req.start_prefill((ECHO, index), None, time.monotonic())
                loads[index] += 1
                msg = m.RunMsg(req.spec(), req.prefill_token_ids, req.block_ids)
                sends.append(((ECHO, index), msg))
        return sends

    def on_message(self, core: EngineCore, worker: WorkerKey, msg) -> list[Send]:
        end_s = msg.started_at + msg.step_s
        core.record_phase("decode", worker, end_s, msg.step_s, len(msg.request_ids))
        return append_step(core, worker, msg, time.monotonic())

    def stop_msg(self, request_ids: list[int]):
        return m.AbortMsg(request_ids)

    def loads(self, core: EngineCore) -> Counter:
        return requests_per_worker(core, ECHO)


class EchoWorker:
    """In-process stand-in for a worker loop: each step gives every request it holds its next
    prompt token, and lets go of a request after its last one."""

    def __init__(self):
        self.inbox: deque = deque()
        self.running: list[list] = []  # [RunMsg, tokens given]

    def step(self) -> m.TokensMsg | None:
        while self.inbox:
            msg = self.inbox.popleft()
            if isinstance(msg, m.RunMsg):
                self.running.append([msg, 0])
        if not self.running:
            return None
        ids, tokens, finished = [], [], []
        for entry in self.running:
            run, n = entry
            ids.append(run.request.request_id)
            tokens.append(run.token_ids[n])
            finished.append(n + 1 == len(run.token_ids))
            entry[1] = n + 1
        self.running = [e for e in self.running if e[1] < len(e[0].token_ids)]
        return m.TokensMsg(ids, tokens, finished, step_s=0.001, started_at=time.monotonic())


ECHO_SPEC = RoleSpec(
    name=ECHO, make=lambda config: EchoRole(), worker=EchoWorker, prefill_budget=None,
    decodes=True,
)  # fmt: skip


@pytest.fixture
def echo_role():
    register(ECHO_SPEC)
    yield ECHO_SPEC
    del ROLES[ECHO]


def test_a_role_defined_in_one_place_runs_through_the_core(echo_role):
    tokenizer = build_tokenizer()
    config = EngineConfig(block_size=4)
    checker = PromptChecker(tokenizer, len(tokenizer), max_model_len=64)
    num_blocks = 6  # two requests of 12 tokens at a time: the rest wait for blocks
    core = EngineCore(
        config, num_blocks, checker, (tokenizer.eos_token_id,), make_roles(config, [ECHO])
    )
    assert list(core.roles) == [ECHO]
    workers = {(ECHO, 0): EchoWorker(), (ECHO, 1): EchoWorker()}
    prompts = [[5 + i + j for j in range(3 + i % 4)] for i in range(7)]
    reqs = []
    for prompt in prompts:
        req = core.new_request(prompt, SamplingParams(max_new_tokens=len(prompt)))
        core.add_request(req)
        reqs.append(req)

    def deliver(sends: list[Send]) -> None:
        for key, msg in sends:
            workers[key].inbox.append(msg)

    for _ in range(100):
        deliver(core.schedule({ECHO: [0, 1]}))
        for key, worker in workers.items():
            msg = worker.step()
            if msg is not None:
                deliver(core.on_message(key, msg))
        if all(r.handle.done() for r in reqs):
            break
    assert core.pool.num_free == num_blocks
    assert not core.requests
    for req, prompt in zip(reqs, prompts):
        out = req.handle.result(timeout=0)
        assert out.token_ids == prompt and out.finish_reason == "length"
    assert core.phase_counters["decode_steps"] > 0
