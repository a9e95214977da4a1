"""SLO-aware phase control: the controller's ladder and steps as pure logic, the scheduler's
prefill concurrency, the engine core applying a step (scripted workers), and real workers under
``phase_control="slo"`` with every token equal to ``generate()``'s."""

from __future__ import annotations

import time

import pytest

from splitwiser import SplitwiserPipeline
from splitwiser.config import EngineConfig
from splitwiser.core.phase_control import (
    MIN_OBSERVATIONS,
    Level,
    SloPhaseController,
    ladder,
)
from splitwiser.core.request import Request
from splitwiser.core.scheduler import Scheduler
from splitwiser.errors import ConfigError, SplitwiserError
from splitwiser.kv.block_pool import BlockPool
from splitwiser.outputs import RequestMetrics
from splitwiser.sampling import SamplingParams
from tests.conftest import hf_greedy


def test_the_ladder_takes_prompt_workers_away_first_then_halves_the_budget():
    assert ladder(2, 4096) == [
        Level(2, 4096), Level(1, 4096), Level(1, 2048), Level(1, 1024), Level(1, 512),
        Level(1, 256),
    ]  # fmt: skip
    assert ladder(1, 300) == [Level(1, 300)]  # nothing to give: static


def _controller(ttft_ms=100.0, tpot_ms=10.0, window_s=1.0):
    seconds = (None if v is None else v / 1e3 for v in (ttft_ms, tpot_ms))
    return SloPhaseController(*seconds, ladder(2, 4096), window_s, now=0.0)


def _window(ctl, now, ttft_ms, tpot_ms, n=MIN_OBSERVATIONS):
    for _ in range(n):
        ctl.observe_ttft(ttft_ms / 1e3)
        ctl.observe_tpot(tpot_ms / 1e3)
    return ctl.tick(now)


def test_a_missed_tpot_steps_toward_decode_once_per_window():
    ctl = _controller()
    assert _window(ctl, 0.5, ttft_ms=50, tpot_ms=30) is None  # the window is not over
    assert ctl.tick(1.0) == Level(1, 4096)  # judged at its end: one step
    assert ctl.tick(1.5) is None  # a new window, nothing in it yet
    assert _window(ctl, 2.0, ttft_ms=50, tpot_ms=30) == Level(1, 2048)
    (first, second) = ctl.decisions
    assert (first.level, second.level) == (1, 2) and "toward decode" in first.why
    assert "TPOT at 3.00x" in first.why


def test_a_missed_ttft_steps_back_toward_prefill_and_never_below_level_0():
    ctl = _controller()
    _window(ctl, 1.0, ttft_ms=50, tpot_ms=30)
    assert _window(ctl, 2.0, ttft_ms=300, tpot_ms=5) == Level(2, 4096)
    assert _window(ctl, 3.0, ttft_ms=300, tpot_ms=5) is None  # at level 0 already
    assert ctl.level == 0 and len(ctl.decisions) == 2


@pytest.mark.parametrize(
    "ttft_ms, tpot_ms",
    [
        (50, 8),  # both met
        (150, 14),  # both missed alike (1.5x, 1.4x): short of capacity, no trade
        (90, 11),  # TPOT over, but not by the margin over TTFT (0.9x)
    ],
)
def test_no_step_without_a_clear_miss(ttft_ms, tpot_ms):
    ctl = _controller()
    assert _window(ctl, 1.0, ttft_ms, tpot_ms) is None and ctl.level == 0


def test_too_few_observations_extend_the_window_and_a_missing_slo_is_never_missed():
    ctl = _controller()
    assert _window(ctl, 1.0, ttft_ms=50, tpot_ms=30, n=MIN_OBSERVATIONS - 1) is None
    assert _window(ctl, 1.2, ttft_ms=50, tpot_ms=30, n=1) == Level(1, 4096)
    ctl = _controller()  # TPOTs alone (the TTFTs of a window's requests came before it)
    for _ in range(MIN_OBSERVATIONS):
        ctl.observe_tpot(0.1)
    assert ctl.tick(1.0) is None and ctl.level == 0
    ctl = _controller(ttft_ms=None)
    assert _window(ctl, 1.0, ttft_ms=10_000, tpot_ms=30) == Level(1, 4096)
    ctl = _controller(tpot_ms=None)
    assert _window(ctl, 1.0, ttft_ms=50, tpot_ms=10_000) is None


def test_the_deepest_level_stays():
    ctl = _controller()
    for t in range(1, 10):
        _window(ctl, float(t), ttft_ms=10, tpot_ms=100)
    assert ctl.level == len(ctl.levels) - 1 and ctl.current == Level(1, 256)
    assert len(ctl.decisions) == len(ctl.levels) - 1


def _req(rid: int, n: int) -> Request:
    params = SamplingParams(max_new_tokens=4)
    prompt = [100 * rid + i for i in range(n)]  # no shared prefix
    return Request(rid, None, prompt, params, 0, 4, RequestMetrics(0.0))


def test_prefill_concurrency_keeps_idle_prompt_workers_idle():
    sched = Scheduler(BlockPool(256), 4, max_prefill_tokens=16)
    for i in range(12):  # two to a batch
        sched.add(_req(i, 8))
    assert [w for w, _ in sched.schedule({0: 0, 1: 0})] == [0, 1]  # unbounded: both
    sched.prefill_concurrency = 1
    assert [w for w, _ in sched.schedule({0: 0, 1: 0})] == [0]
    # worker 1 is busy: it may queue its next batch, worker 0 stays idle
    assert [w for w, _ in sched.schedule({0: 0, 1: 1})] == [1]
    sched.prefill_concurrency = 2
    assert [w for w, _ in sched.schedule({0: 0, 1: 2})] == [0]  # 1 is full: 0 may start


def test_phase_control_is_a_known_mode_of_the_split_with_positive_slos():
    with pytest.raises(ConfigError, match="phase_control must be one of static, slo"):
        EngineConfig(phase_control="adaptive")
    with pytest.raises(ConfigError, match="tpot_slo_ms must be positive"):
        EngineConfig(phase_control="slo", tpot_slo_ms=0)
    with pytest.raises(ConfigError, match="colocated engine has neither"):
        EngineConfig(phase_control="slo", colocated=True)


def test_real_workers_step_toward_the_missed_phase_and_back_with_exact_tokens(
    model_dirs, reference_models, leftovers
):
    """An SLO no decode can meet (1 us TPOT) moves the prompt workers' share toward decode,
    window after window; one no prefill can meet moves it back. Every token equals
    ``generate()``'s at every level."""
    prompts = [[5 + i, 9, 200, 31, 7, 11 + i, 40 + i] for i in range(32)]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    options = {"phase_control": "slo", "ttft_slo_ms": 1e6, "tpot_slo_ms": 1e-3,
               "phase_control_window_s": 0.05, "max_prefill_tokens": 512}  # fmt: skip
    outs = []
    with SplitwiserPipeline(model_dirs["llama"], device="cpu", **options) as pipe:
        for i in range(0, 16, 8):  # a window's worth of observations, then the window ends
            outs += pipe.generate(prompts[i : i + 8], params)
            time.sleep(0.06)
        toward_decode = pipe.stats()["phase_control"]
        pipe.set_phase_slo(ttft_ms=1e-3, tpot_ms=None)
        for i in range(16, 32, 8):
            outs += pipe.generate(prompts[i : i + 8], params)
            time.sleep(0.06)
        back = pipe.stats()["phase_control"]
    assert toward_decode["mode"] == "slo" and toward_decode["level"] >= 1
    first = toward_decode["decisions"][0]
    assert first["prefill_concurrency"] == 1 and "toward decode" in first["why"]
    assert (
        back["level"] < toward_decode["level"] and "toward prefill" in back["decisions"][-1]["why"]
    )
    assert back["ttft_slo_ms"] == 1e-3 and back["tpot_slo_ms"] is None
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(reference_models["llama"], prompt, 6)
    with SplitwiserPipeline(model_dirs["llama"], device="cpu") as pipe:
        assert pipe.stats()["phase_control"] == {"mode": "static"}
        with pytest.raises(SplitwiserError, match="needs phase_control='slo'"):
            pipe.set_phase_slo(ttft_ms=100)
    leftovers.assert_clean()
