"""``prefix-repetition``: a few long prefixes, each followed by many short suffixes of its own,
as ``vllm bench serve --dataset-name prefix_repetition`` builds them (its
``--prefix-repetition-prefix-len``, ``-suffix-len``, ``-num-prefixes``; the output length is the
run's ``--output-len``, as vLLM maps ``--output-len`` onto it).

``num_requests // num_prefixes`` prompts per prefix (the rest dropped, as vLLM), shuffled with the
run's seed. vLLM draws random token ids; here the prefix and every suffix are windows of real text
in the model's tokens, as the other workloads' prompts: a request's prompt is its prefix's
``prefix_len`` tokens followed by its own ``suffix_len``.
"""

from __future__ import annotations

import random

from splitwiser.benchmark.bench_request import BenchRequest, window
from splitwiser.errors import ConfigError


def build_requests(
    num_requests: int, prefix_len: int, suffix_len: int, num_prefixes: int, output_len: int,
    max_context: int, rng: random.Random,
) -> tuple[list, dict]:  # fmt: skip
    """The requests (prefix index in ``prefix``, all arriving at 0) and the workload's facts."""

    for name, value, minimum in (("prefix-len", prefix_len, 0), ("suffix-len", suffix_len, 1),
                                 ("num-prefixes", num_prefixes, 1)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(
                f"--prefix-repetition-{name} must be an integer >= {minimum}, got {value!r}"
            )
    per_prefix = num_requests // num_prefixes
    if per_prefix == 0:
        raise ConfigError(
            f"--num-requests ({num_requests}) must be at least "
            f"--prefix-repetition-num-prefixes ({num_prefixes})"
        )
    prompt_len = prefix_len + suffix_len
    if prompt_len + output_len > max_context:
        raise ConfigError(
            f"prefix + suffix + output = {prompt_len + output_len} tokens exceed the context of "
            f"{max_context}; shorten them or raise --max-context"
        )
    groups = [p for p in range(num_prefixes) for _ in range(per_prefix)]
    rng.shuffle(groups)  # as vLLM: the prefixes' requests interleaved
    requests = [BenchRequest(i, 0.0, prompt_len, output_len, prefix=p)
                for i, p in enumerate(groups)]  # fmt: skip
    info = {"prefix_len": prefix_len, "suffix_len": suffix_len, "num_prefixes": num_prefixes,
            "prompts_per_prefix": per_prefix}  # fmt: skip
    if per_prefix * num_prefixes < num_requests:
        info["note"] = f"{num_requests - per_prefix * num_prefixes} requests dropped (as vLLM)"
    return requests, info


def build_prompts(workload, corpus: list[int], rng: random.Random) -> list[list[int]]:
    """Each request's prompt: its prefix (one window per prefix), then a window of its own."""

    info = workload.info
    prefixes = [window(corpus, rng.randrange(len(corpus)), info["prefix_len"])
                for _ in range(info["num_prefixes"])]  # fmt: skip
    return [prefixes[r.prefix] + window(corpus, rng.randrange(len(corpus)), info["suffix_len"])
            for r in workload.requests]  # fmt: skip
