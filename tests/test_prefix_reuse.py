"""Prefix reuse across a conversation's turns (CPU): a prompt that starts with what the KV cache holds from the last
request prefills only the rest, and gives the same tokens as a whole prefill (plain and speculative decoding), in
process and through a real server."""

from __future__ import annotations

import re
import urllib.request

import pytest

from ipc.messages import Finished
from jit_context.generator import CPU_PREFILL_CHUNK, GenerationResult, Generator
from jit_context.kv_contents import KvContents
from jit_context.sampling_params import SamplingParams
from jit_context.speculative_config import SpeculativeConfig

TURN_1 = [{"role": "user", "content": "List three fruits and say one thing about each."}]
FOLLOW_UP = {"role": "user", "content": "Now the same for three vegetables."}
TOKENS = 6


def test_kv_contents_reuse_the_common_prefix_and_never_the_last_prompt_token():
    kv = KvContents(max_context=64)
    assert kv.reusable([1, 2, 3]) == 0
    kv.hold([1, 2, 3, 4, 5])
    assert kv.reusable([1, 2, 3, 9, 9]) == 3
    assert kv.reusable([1, 2, 3, 4, 5, 6, 7]) == 5
    assert kv.reusable([1, 2, 3, 4, 5]) == 4  # the same prompt again: its last token is prefilled for the logits
    assert kv.reusable([1, 2]) == 1
    assert kv.reusable([7, 1, 2]) == 0
    kv.forget()
    assert len(kv) == 0 and kv.reusable([1, 2, 3]) == 0
    kv.hold(list(range(64)))  # a request that filled the context: the last row is the executor's scratch row
    assert len(kv) == 63 and kv.reusable(list(range(70))) == 63


def _run(gen: Generator, prompt_ids: list[int]) -> GenerationResult:
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    *_, result = gen.generate(prompt_ids, params)
    assert isinstance(result, GenerationResult)
    return result


def _generator(engine, reuse: bool, speculation: SpeculativeConfig | None = None) -> Generator:
    side = engine.side
    return Generator(engine.port, side.tokenizer, side.eos_token_ids, prefill_chunk=CPU_PREFILL_CHUNK,
                     speculation=speculation, prefix_reuse=reuse)


@pytest.mark.parametrize("speculation", [None, SpeculativeConfig("ngram")], ids=["plain", "ngram"])
def test_a_follow_up_turn_prefills_only_its_new_tokens_and_gives_the_same_tokens(cpu_engine, speculation):
    tok = cpu_engine.tokenizer
    reuse = _generator(cpu_engine, True, speculation)
    first_prompt = tok.apply_chat_template(TURN_1)
    first = _run(reuse, first_prompt)
    assert first.cached_tokens == 0  # this generator knows nothing of what the cache holds yet
    turn_2 = [*TURN_1, {"role": "assistant", "content": tok.decode(first.token_ids)}, FOLLOW_UP]
    prompt = tok.apply_chat_template(turn_2)
    second = _run(reuse, prompt)
    assert len(first_prompt) <= second.cached_tokens <= len(first_prompt) + TOKENS - 1
    again = _run(reuse, prompt)  # the same prompt: all but its last token are in the cache
    assert again.cached_tokens == len(prompt) - 1 and again.token_ids == second.token_ids
    # The reference: the whole prompt prefilled (it overwrites the cache, so `reuse` is not used after it).
    whole = _run(_generator(cpu_engine, False), prompt)
    assert whole.cached_tokens == 0 and whole.token_ids == second.token_ids


def test_a_request_that_ends_abnormally_leaves_nothing_to_reuse(cpu_engine):
    tok = cpu_engine.tokenizer
    reuse = _generator(cpu_engine, True)
    prompt = tok.apply_chat_template(TURN_1)
    _run(reuse, prompt)
    stream = reuse.generate(prompt, SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True))
    next(stream)  # the first token, then the client goes away
    stream.close()
    assert len(reuse.kv) == 0  # the next request prefills its prompt whole


def test_the_server_reports_the_reused_prompt_tokens(shared_server):
    from launch.client import Client

    with Client(shared_server.address) as client:
        params = {"max_tokens": TOKENS, "temperature": 0.0, "ignore_eos": True}
        first = list(client.generate(messages=TURN_1, params=params))[-1]
        assert isinstance(first, Finished)
        turn_2 = [*TURN_1, {"role": "assistant", "content": first.text}, FOLLOW_UP]
        second = list(client.generate(messages=turn_2, params=params))[-1]
        again = list(client.generate(messages=turn_2, params=params))[-1]
    assert second.timings["cached_prompt_tokens"] >= first.usage["prompt_tokens"]
    assert again.timings["cached_prompt_tokens"] == again.usage["prompt_tokens"] - 1
    assert again.token_ids == second.token_ids
    with urllib.request.urlopen(f"{shared_server.http}/metrics", timeout=10) as r:
        text = r.read().decode()
    hits = int(re.search(r"^hybridrt:prefix_cache_hits_total\{[^}]*\} (\d+)$", text, re.MULTILINE).group(1))
    assert hits >= second.timings["cached_prompt_tokens"] + again.timings["cached_prompt_tokens"]


@pytest.mark.cuda
@pytest.mark.parametrize("speculation", [None, SpeculativeConfig("ngram")], ids=["plain", "ngram"])
def test_gpu_follow_up_turn_extends_the_cache_with_the_tokens_of_a_whole_prefill(smollm2_real, speculation):
    """The same on the GPU path (SmolLM2 real weights, float32 so that no argmax is a rounding tie between the
    extend and whole-prompt step shapes): the follow-up turn is an extend step from the cached prefix, and every
    graph captured between the turns (as an idle server does) leaves the cached prefix valid."""
    from graph_executor.loading.loader import LoadConfig
    from launch.local import LocalEngine

    gguf, tokenizer = smollm2_real
    engine = LocalEngine(LoadConfig(model=gguf, device="cuda", dtype="float32", max_context=1024, dequantize=True,
                                    progress=False), tokenizer)
    tok, side = engine.tokenizer, engine.side
    reuse = Generator(engine.port, tok, side.eos_token_ids, speculation=speculation, prefix_reuse=True)
    first_prompt = tok.apply_chat_template(TURN_1)
    engine.runner.graphs.clear()  # the first turn runs eagerly; its graphs are captured between the turns,
    first = _run(reuse, first_prompt)
    engine.runner.capture_all()  # as an idle server does: warm-up runs and upload replays over the cache
    turn_2 = [*TURN_1, {"role": "assistant", "content": tok.decode(first.token_ids)}, FOLLOW_UP]
    prompt = tok.apply_chat_template(turn_2)
    second = _run(reuse, prompt)
    assert len(first_prompt) <= second.cached_tokens <= len(first_prompt) + TOKENS - 1
    whole = _run(Generator(engine.port, tok, side.eos_token_ids), prompt)
    assert whole.cached_tokens == 0 and whole.token_ids == second.token_ids
