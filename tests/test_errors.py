"""Bad input gets a specific error that says what to change; the CLI prints one line, exit 2."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from splitwiser import (
    ConfigError,
    InvalidRequestError,
    KVCacheTooSmallError,
    ModelNotFoundError,
    SamplingParams,
    SequentialPipeline,
    SplitwiserError,
    SplitwiserPipeline,
)
from splitwiser.kv import pool as kv_pool
from tests.conftest import hf_greedy


@pytest.fixture(scope="module")
def small_pool(model_dirs):
    # 4 blocks of 16 tokens: room for one short request at a time
    with SplitwiserPipeline(model_dirs["llama"], device="cpu", num_kv_blocks=4) as pipe:
        yield pipe


def test_empty_prompt(small_pool):
    for empty in ("", []):
        with pytest.raises(InvalidRequestError, match="empty"):
            small_pool.generate([empty])


def test_prompt_longer_than_context(small_pool):
    with pytest.raises(InvalidRequestError, match="context is 256 tokens; shorten"):
        small_pool.generate([[1] * 300])


def test_bad_token_ids(small_pool):
    with pytest.raises(InvalidRequestError, match="outside the model's vocabulary"):
        small_pool.generate([[1, 10**7]])


def test_bad_max_new_tokens():
    for bad in (0, -3):
        with pytest.raises(InvalidRequestError, match="max_new_tokens must be a positive"):
            SamplingParams(max_new_tokens=bad)


def test_request_that_can_never_fit_is_rejected_at_once(small_pool, reference_models):
    with pytest.raises(
        KVCacheTooSmallError, match="needs 7 KV blocks .* has only 4; raise num_kv_blocks"
    ):
        small_pool.generate([[1] * 90], SamplingParams(max_new_tokens=20))
    # requests that fit still run, and more of them than the pool holds at once wait their turn
    # in the same few blocks: each its own prompt, so K/V left in a reused block would show
    prompts = [[1 + i, 2 + 3 * i, 3 + 5 * i] for i in range(6)]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    outs = small_pool.generate(prompts, params)
    model = reference_models["llama"]
    assert [o.token_ids for o in outs] == [hf_greedy(model, p, 30) for p in prompts]
    assert small_pool.stats()["num_free_blocks"] == 4


def test_a_request_needing_exactly_the_whole_pool_runs(small_pool, reference_models):
    # 35 prompt + 30 new tokens: 64 cached (the last token never is), the 4 blocks exactly
    prompt = [(7 * i) % 900 + 1 for i in range(35)]
    out = small_pool.generate([prompt], SamplingParams(max_new_tokens=30, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(reference_models["llama"], prompt, 30)
    with pytest.raises(KVCacheTooSmallError, match="needs 5 KV blocks .* has only 4"):
        small_pool.generate([prompt + [1]], SamplingParams(max_new_tokens=30))
    assert small_pool.stats()["num_free_blocks"] == 4


def test_unknown_model_path(leftovers):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        SplitwiserPipeline("/no/such/model", device="cpu")
    with pytest.raises(ModelNotFoundError, match="unknown random preset"):
        SequentialPipeline("random:gpt-17", device="cpu")
    leftovers.assert_clean()


def test_folder_that_is_not_a_model(tmp_path, model_dirs, leftovers):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        SplitwiserPipeline(str(tmp_path), device="cpu")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text(
        (Path(model_dirs["llama"]) / "config.json").read_text()
    )
    with pytest.raises(ModelNotFoundError, match="cannot load model .*config-only"):
        SplitwiserPipeline(str(config_only), device="cpu")
    leftovers.assert_clean()


def test_a_rejected_prompt_cancels_the_ones_before_it(small_pool, monkeypatch):
    submitted = []
    submit = small_pool.submit
    monkeypatch.setattr(
        small_pool, "submit", lambda *a: submitted.append(submit(*a)) or submitted[-1]
    )
    prompts = [[1, 2, 3], [4, 5, 6], []]  # the third is empty
    with pytest.raises(InvalidRequestError, match="empty"):
        small_pool.generate(prompts, SamplingParams(max_new_tokens=40, ignore_eos=True))
    assert len(submitted) == 2
    # not left decoding for nobody: both end as aborted, well before their 40 tokens
    outs = [h.result(timeout=10) for h in submitted]
    assert [o.finish_reason for o in outs] == ["abort", "abort"]
    assert small_pool.stats()["num_free_blocks"] == 4


def test_cpu_pool_larger_than_free_shared_memory(model_dirs, monkeypatch, leftovers):
    monkeypatch.setattr(kv_pool, "shm_free_bytes", lambda: 8 << 20)  # an 8 MiB /dev/shm
    with pytest.raises(ConfigError, match=r"needs 64 MiB of shared memory .* lower kv_cache_bytes"):
        SplitwiserPipeline(model_dirs["llama"], device="cpu", kv_cache_bytes=64 << 20)
    leftovers.assert_clean()
    # by default the pool takes at most half of what is free there
    with SplitwiserPipeline(model_dirs["llama"], device="cpu") as pipe:
        assert pipe.num_kv_blocks * pipe.stats()["kv_bytes_per_block"] <= 4 << 20


def test_expandable_segments_detected(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64, expandable_segments:True")
    assert kv_pool._expandable_segments_on()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    assert not kv_pool._expandable_segments_on()


def test_zero_workers(leftovers):
    with pytest.raises(ConfigError, match="num_token_workers must be an integer >= 1, got 0"):
        SplitwiserPipeline(num_token_workers=0)
    leftovers.assert_clean()


def test_bad_dtype():
    with pytest.raises(ConfigError, match="unknown dtype 'float13'; use 'float32'"):
        SplitwiserPipeline(dtype="float13", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_requested_without_gpu():
    with pytest.raises(ConfigError, match="no CUDA GPU is available; use device='cpu'"):
        SplitwiserPipeline(device="cuda")


def test_all_errors_share_one_base():
    for exc in (ConfigError, InvalidRequestError, KVCacheTooSmallError, ModelNotFoundError):
        assert issubclass(exc, SplitwiserError)


def splitwiser_in_process(*args: str) -> Result:
    """``splitwiser ARGS`` run in this process through the command's own ``main`` (which turns
    every error into one line and exit code 2), stdout and stderr captured apart."""
    from splitwiser.cli import main

    sigterm = signal.getsignal(signal.SIGTERM)  # main() installs its own handler
    try:
        return CliRunner().invoke(main, list(args), prog_name="splitwiser", catch_exceptions=False)
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def assert_one_line_error(exit_code: int, stderr: str, message: str) -> None:
    lines = stderr.strip().splitlines()
    assert exit_code == 2, stderr
    assert len(lines) == 1 and message in lines[0], stderr
    assert lines[0].startswith("splitwiser: error:") and "Traceback" not in stderr


GENERATE_ERRORS = [
    (["generate", "--model", "/no/such/model", "hi"], "does not exist"),
    (["generate", "--token-workers", "0", "hi"], "num_token_workers must be"),
    (["generate", "--max-new-tokens", "0", "hi"], "max_new_tokens must be"),
]


@pytest.mark.parametrize("args, message", GENERATE_ERRORS)
def test_cli_errors_are_one_line_exit_2(args, message, leftovers):
    result = splitwiser_in_process(*args)
    assert_one_line_error(result.exit_code, result.stderr, message)
    assert result.stdout == ""
    leftovers.assert_clean()


def test_cli_errors_are_one_line_exit_2_in_a_real_process():
    """The same contract where nothing catches the exit: a fresh interpreter's stderr."""
    args, message = GENERATE_ERRORS[0]
    proc = subprocess.run(
        [sys.executable, "-m", "splitwiser", *args], capture_output=True, text=True, timeout=120
    )
    assert_one_line_error(proc.returncode, proc.stderr, message)


def test_ctrl_c_while_the_command_line_loads_is_one_line():
    """SIGINT while torch and transformers are still being imported: one line, exit 130."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitwiser", "model", "info"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.4)  # inside the imports (they take seconds)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
