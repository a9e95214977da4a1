"""Bad input gets a specific error that says what to change; the CLI prints one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_request_that_can_never_fit_is_rejected_at_once(small_pool):
    with pytest.raises(
        KVCacheTooSmallError, match="needs 7 KV blocks .* has only 4; raise num_kv_blocks"
    ):
        small_pool.generate([[1] * 90], SamplingParams(max_new_tokens=20))
    # requests that fit still run, and more of them than the pool holds at once wait their turn
    outs = small_pool.generate([[1, 2, 3]] * 6, SamplingParams(max_new_tokens=30, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [30] * 6
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


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "/no/such/model", "hi"], "does not exist"),
        (["generate", "--token-workers", "0", "hi"], "num_token_workers must be"),
        (["generate", "--max-new-tokens", "0", "hi"], "max_new_tokens must be"),
    ],
)
def test_cli_errors_are_one_line_exit_2(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "splitwiser", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


def test_ctrl_c_while_the_command_line_loads_is_one_line():
    """SIGINT while torch and transformers are still being imported: one line, exit 130."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "splitwiser", "model", "info"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.4)  # inside the imports (they take seconds)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
