"""A generated token's log-probability and the top tokens' (`SamplingParams.logprobs`): the sampler against a float64
log-softmax of the raw logits, the batch-1 and batched generators against the model's own logits step by step, the
wire form, and the OpenAI formats of both HTTP routes."""

from __future__ import annotations

import pytest
import torch

from graph_executor.runner import ModelRunner
from ipc import codec
from ipc.messages import Finished, LogprobsChunk, TokenChunk, TokenLogprob
from jit_context.generator import Generator
from jit_context.sampler import Sampler
from jit_context.sampling_params import SamplingParams
from tests.test_batching import _drain
from tests.test_quant_model import run_steps
from tests.test_robustness import tiny_runner

PROMPT = [5, 9, 200, 17, 4]


def reference(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[int], list[float]]:
    """float64 log-softmax of raw logits [V]: the token's log-probability, the top k ids and theirs."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    values, ids = torch.sort(lp, descending=True)
    return float(lp[token]), ids[:k].tolist(), values[:k].tolist()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, logprobs=0), SamplingParams(temperature=0.0, logprobs=5),
    SamplingParams(temperature=0.9, top_k=8, seed=3, logprobs=3),
    # the raw distribution: a penalty or a bias moves the draw, not the reported log-probabilities
    SamplingParams(temperature=0.0, logprobs=4, repetition_penalty=1.5, frequency_penalty=1.0,
                   logit_bias=((11, 6.0),)),
], ids=["greedy-0", "greedy-5", "sampled-3", "penalized-4"])
def test_the_sampler_s_logprobs_are_the_raw_log_softmax_s(params: SamplingParams) -> None:
    vocab, gen = 40, torch.Generator().manual_seed(2)
    sampler = Sampler(vocab, torch.device("cpu"))
    sampler.start_request(params, [1, 2])
    assert not sampler.plain_greedy and sampler.logprobs_k == params.logprobs
    for step in range(12):
        logits = torch.randn(vocab, generator=gen) * 3
        token = int(sampler.sample(logits))
        sampler.observe(torch.tensor([token]))
        values = sampler.last_logprobs.tolist()
        k = params.logprobs
        assert len(values) == 1 + 2 * k
        want, ids, tops = reference(logits, token, k)
        assert abs(values[0] - want) < 1e-5, step
        assert [int(v) for v in values[1 + k:]] == ids and max(abs(a - b) for a, b in zip(values[1:1 + k], tops,
                                                                                            strict=True)) < 1e-5 \
            if k else True, step


def test_the_generator_reports_each_token_s_logprobs_from_the_model_s_logits() -> None:
    """Batch-1 (decode_ahead 2: tokens read while the next steps are queued), greedy: each token's log-probability and
    its top 3 against a float64 log-softmax of the same model's logits at that step (teacher-forced on the tokens
    drawn); chunks and the result carry the same entries, texts empty without a tokenizer."""
    runner = tiny_runner(max_context=64)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=3)
    items = list(Generator(runner, None, frozenset({2}), decode_ahead=2).generate(PROMPT, params))
    result = items[-1]
    chunks = [item for item in items[:-1] if item.token_ids]
    assert [c.logprobs[0] for c in chunks] == result.logprobs and len(result.logprobs) == 10
    logits, _ = run_steps(tiny_runner(max_context=64), PROMPT, result.token_ids, 10)
    for step, (entry, token) in enumerate(zip(result.logprobs, result.token_ids, strict=True)):
        want, ids, tops = reference(logits[step], token, 3)
        assert entry.token == token and entry.text == "" and entry.top_texts == ["", "", ""]
        assert abs(entry.logprob - want) < 1e-4 and entry.top_ids == ids, step
        assert max(abs(a - b) for a, b in zip(entry.top_logprobs, tops, strict=True)) < 1e-4, step
        assert entry.top_ids[0] == token  # greedy: the token is the most likely
    plain = list(Generator(runner, None, frozenset({2})).generate(PROMPT, SamplingParams(
        max_tokens=10, temperature=0.0, ignore_eos=True)))[-1]
    assert plain.token_ids == result.token_ids and plain.logprobs is None


@pytest.mark.cuda
@pytest.mark.parametrize("ahead", [1, 3])
def test_on_a_gpu_each_token_s_logprobs_ride_the_token_s_pinned_copy(ahead: int) -> None:
    """On a GPU the log-probabilities go to pinned memory beside the token (TokenReader's extra values), copied before
    the next steps overwrite Sampler.last_logprobs: with decode_ahead 3 the host reads token k while steps k+1..k+2
    are queued, and each token still gets its own step's values (float64 reference of the same model's logits)."""
    runner = tiny_runner(max_context=64, device="cuda")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=4)
    result = list(Generator(runner, None, frozenset({2}), decode_ahead=ahead).generate(PROMPT, params))[-1]
    logits, _ = run_steps(tiny_runner(max_context=64, device="cuda"), PROMPT, result.token_ids, 12)
    for step, (entry, token) in enumerate(zip(result.logprobs, result.token_ids, strict=True)):
        want, ids, tops = reference(logits[step].cpu(), token, 4)
        assert abs(entry.logprob - want) < 1e-4 and entry.top_ids == ids, step
        assert max(abs(a - b) for a, b in zip(entry.top_logprobs, tops, strict=True)) < 1e-4, step


def test_a_token_that_ends_the_reply_has_no_entry() -> None:
    """EOS (or a stop token id) ends the reply without text: as OpenAI lists them, the entries are the reply's text
    tokens only, so their texts add up to it."""
    runner = tiny_runner(max_context=64)
    free = list(Generator(runner, None, frozenset()).generate(PROMPT, SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True)))[-1].token_ids
    end = free[3]
    stop_at = free.index(end)
    items = list(Generator(runner, None, frozenset({end})).generate(PROMPT, SamplingParams(
        max_tokens=8, temperature=0.0, logprobs=1)))
    result = items[-1]
    assert result.token_ids == free[:stop_at + 1] and result.finish_reason == "stop"
    assert [e.token for e in result.logprobs] == free[:stop_at]
    last = [item for item in items[:-1] if item.token_ids][-1]
    assert last.token_ids == [end] and last.logprobs is None


def test_logprobs_turn_speculation_off_for_the_request_with_the_same_tokens() -> None:
    from jit_context.speculative_config import SpeculativeConfig

    runner = tiny_runner(max_context=64)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    spec = list(Generator(runner, None, frozenset({2}), speculation=SpeculativeConfig("ngram", 3))
                .generate(PROMPT, params))[-1]
    plain = list(Generator(runner, None, frozenset({2})).generate(PROMPT, params))[-1]
    assert spec.token_ids == plain.token_ids and spec.logprobs == plain.logprobs and spec.speculation is None


def test_batched_requests_report_the_logprobs_they_report_alone() -> None:
    from graph_executor.loading.loader import _fill_random
    from graph_executor.model import LlamaModel
    from jit_context.batch import BatchEngine

    base = tiny_runner().model
    model = LlamaModel(base.config, 64, torch.device("cpu"), torch.float32, slots=3)
    _fill_random(model, seed=3)
    engine = BatchEngine(ModelRunner(model), None, frozenset({2}), 4)
    requests = {"a": ([5, 9, 200], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)),
                "b": ([7, 7, 8, 1], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)),
                "c": ([40, 41], SamplingParams(max_tokens=7, temperature=0.8, seed=5, ignore_eos=True, logprobs=0))}
    results, _ = _drain(engine, [(key, prompt, params) for key, (prompt, params) in requests.items()])
    alone = Generator(tiny_runner(max_context=64), None, frozenset({2}))
    for key, (prompt, params) in requests.items():
        want = list(alone.generate(prompt, params))[-1]
        assert results[key].token_ids == want.token_ids, key
        if params.logprobs is None:
            assert results[key].logprobs is None
            continue
        for got, ref in zip(results[key].logprobs, want.logprobs, strict=True):
            assert got.token == ref.token and got.top_ids == ref.top_ids and abs(got.logprob - ref.logprob) < 1e-5


def test_logprobs_travel_in_a_chunk_kind_of_their_own() -> None:
    """A LogprobsChunk (a TokenChunk to every reader) carries its tokens' entries; a plain TokenChunk and Finished
    carry no field for them (the token path's frames unchanged; a long reply's entries would pass the frame limit:
    ~480 bytes a token with 20 top tokens)."""
    entry = TokenLogprob(12, " the", -0.25, [12, 7], [" the", " a"], [-0.25, -1.75])
    with_entries = LogprobsChunk("r", " the", [12], [entry])
    assert isinstance(with_entries, TokenChunk) and codec.decode(codec.encode(with_entries)) == with_entries
    assert codec.decode(codec.encode(TokenChunk("r", "x", [3]))) == TokenChunk("r", "x", [3])
    assert "logprobs" not in TokenChunk.__dataclass_fields__ and "logprobs" not in Finished.__dataclass_fields__
    with pytest.raises(Exception, match="as long"):
        codec.decode(codec.encode(LogprobsChunk("r", "", [1], [TokenLogprob(1, "", -1.0, [1, 2], [""], [-1.0])])))


# -- over the native client and the OpenAI HTTP API, two real processes (the session's shared CPU server) -------


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_the_openai_chat_and_completion_forms_carry_the_native_logprobs(shared_server) -> None:
    """Greedy, so the runs agree: the chat form (content entries with bytes and top_logprobs) and the legacy
    completions form (tokens, token_logprobs, top_logprobs maps with the chosen token, text_offset) carry the native
    client's Finished.logprobs for the same request, streamed or not; the token texts add up to the reply."""
    import openai

    from launch.client import Client

    api = openai.OpenAI(base_url=f"{shared_server.http}/v1", api_key="unused", max_retries=0, timeout=60)
    def native_run(**request):
        with Client(shared_server.address) as client:
            *chunks, finished = client.generate(**request)
        return finished, [e for chunk in chunks for e in getattr(chunk, "logprobs", ())]

    with Client(shared_server.address) as client:
        model = client.status()["model"]
    native, native_logprobs = native_run(messages=QUESTION, params={"max_tokens": 6, "temperature": 0.0,
                                                                    "logprobs": 3})
    assert len(native_logprobs) == len(native.token_ids) == 6
    chat = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(e.token for e in content) == chat.choices[0].message.content == native.text
    for entry, ref in zip(content, native_logprobs, strict=True):
        assert entry.token == ref.text and abs(entry.logprob - ref.logprob) < 1e-4 and entry.logprob <= 0
        assert entry.bytes == list(ref.text.encode()) and len(entry.top_logprobs) == 3
        assert [t.token for t in entry.top_logprobs] == ref.top_texts and entry.top_logprobs[0].token == entry.token
        assert all(a.logprob >= b.logprob for a, b in zip(entry.top_logprobs, entry.top_logprobs[1:]))
    streamed = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=6, temperature=0,
                                           logprobs=True, stream=True)
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == [e.token for e in content] and all(e.top_logprobs == [] for e in entries)

    prompt = "The capital of France is"
    native, native_logprobs = native_run(prompt=prompt, params={"max_tokens": 5, "temperature": 0.0, "logprobs": 2})
    done = api.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert "".join(lp.tokens) == done.choices[0].text == native.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(abs(a - b.logprob) < 1e-4 for a, b in zip(lp.token_logprobs, native_logprobs, strict=True))
    assert all(tok in top and len(top) in (2, 3) for tok, top in zip(lp.tokens, lp.top_logprobs, strict=True))
    chunks = [c.choices[0] for c in api.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0,
                                                          logprobs=2, stream=True)]
    listed = [c.logprobs for c in chunks if c.logprobs]
    assert sum((x.tokens for x in listed), []) == lp.tokens
    assert sum((x.text_offset for x in listed), []) == lp.text_offset  # offsets run on across the chunks
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        api.chat.completions.create(model=model, messages=QUESTION, max_tokens=2, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="logprobs must be in"):
        api.completions.create(model=model, prompt=prompt, max_tokens=2, logprobs=21)
    with pytest.raises(openai.BadRequestError, match=r"top_logprobs must be in \[0, 20\], got 21"):
        api.chat.completions.create(model=model, messages=QUESTION, max_tokens=2, logprobs=True, top_logprobs=21)


# The prompt's log-probabilities through the OpenAI API (the rest of their tests: tests/test_prompt_logprobs.py; here
# for the shared server, whose test files run on one worker).


@pytest.fixture(scope="module")
def hf_smollm2(default_model_dir):
    """The default model's weights in transformers (float32): the reference of the served prompt scores."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def _hf_rows(hf, ids: list[int], k: int) -> list[tuple[float, list[int], list[float]]]:
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]  # [n, V]
    lp = torch.log_softmax(logits.double(), dim=-1)
    rows = []
    for i in range(len(ids) - 1):
        top = torch.sort(lp[i], descending=True)
        rows.append((float(lp[i, ids[i + 1]]), top.indices[:k].tolist(), top.values[:k].tolist()))
    return rows


def test_completions_echo_with_logprobs_lists_the_prompt_s_tokens_as_transformers_scores_them(shared_server,
                                                                                               hf_smollm2) -> None:
    """The served default model (two processes, real weights): lm-evaluation-harness's loglikelihood request (token
    ids in a one-prompt list, echo, logprobs 1, max_tokens 1) and vLLM's max_tokens 0 form; the prompt's tokens with
    their log-probabilities (the first null) against transformers' float64 log-softmax, text offsets that add up,
    the generated token after them, also when it ends the reply (lm-eval drops the last entry as the generated
    one); streamed, the echoed prompt's event carries the same."""
    import json

    import httpx

    url = f"{shared_server.http}/v1/completions"
    text = "The capital of France is Paris. The capital of Italy is"
    with httpx.Client(timeout=60) as http:
        ids = http.post(f"{shared_server.http}/tokenize",
                        json={"prompt": text}).json()["tokens"]
        want = _hf_rows(hf_smollm2, ids, 2)
        model = http.get(f"{shared_server.http}/v1/models").json()["data"][0]["id"]
        one = http.post(url, json={"model": model, "prompt": [ids], "echo": True, "logprobs": 2, "max_tokens": 1,
                                   "temperature": 0}).json()
        zero = http.post(url, json={"model": model, "prompt": text, "echo": True, "logprobs": 2,
                                    "max_tokens": 0}).json()
        streamed = http.post(url, json={"model": model, "prompt": text, "echo": True, "logprobs": 2, "max_tokens": 1,
                                        "temperature": 0, "stream": True}).text
        bare = http.post(url, json={"model": model, "prompt": text, "echo": True, "max_tokens": 0}).json()
        # the one generated token ends the reply (a stop token id, made certain by a bias): it is still listed
        ended = http.post(url, json={"model": model, "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1,
                                     "stop_token_ids": [42], "logit_bias": {"42": 100}}).json()
        refused = http.post(url, json={"model": model, "prompt": text, "max_tokens": 0})
    n = len(ids)
    for body in (one, zero):
        assert "choices" in body, body
        lp = body["choices"][0]["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        got = lp["token_logprobs"][1:n]
        assert max(abs(g - w[0]) for g, w in zip(got, want, strict=True)) < 2e-3, body
        for i, (tops, (logprob, _, best)) in enumerate(zip(lp["top_logprobs"][1:n], want, strict=True)):
            assert abs(max(tops.values()) - max(best[0], logprob)) < 2e-3, i  # the top's (or the token's)
            assert lp["tokens"][i + 1] in tops and len(tops) in (2, 3), i  # the top 2 and the token itself
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert zero["choices"][0]["text"] == text and len(zero["choices"][0]["logprobs"]["tokens"]) == n
    assert zero["choices"][0]["finish_reason"] == "length" and zero["usage"]["completion_tokens"] == 0
    assert zero["usage"]["prompt_tokens"] == n == zero["usage"]["total_tokens"]
    generated = one["choices"][0]
    assert len(generated["logprobs"]["tokens"]) == n + 1 and generated["logprobs"]["token_logprobs"][n] is not None
    assert generated["text"] == text + generated["logprobs"]["tokens"][n] and one["usage"]["completion_tokens"] == 1
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    echoed, rest = events[0]["choices"][0], [e["choices"][0] for e in events[1:]]
    assert echoed["text"] == text and echoed["logprobs"] == zero["choices"][0]["logprobs"]
    assert text + "".join(c["text"] for c in rest) == generated["text"]
    tail = [t for c in rest if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert tail == generated["logprobs"]["tokens"][n:] and rest[-1]["finish_reason"] == "length"
    assert bare["choices"][0]["text"] == text and bare["choices"][0]["logprobs"] is None
    last = ended["choices"][0]
    assert last["finish_reason"] == "stop" and last["text"] == text and len(last["logprobs"]["tokens"]) == n + 1
    assert last["logprobs"]["token_logprobs"][:n] == one["choices"][0]["logprobs"]["token_logprobs"][:n]
    assert last["logprobs"]["token_logprobs"][n] is not None  # (its raw log-probability: the bias is not in it)
    assert refused.status_code == 400 and "max_tokens 0 is for echo" in refused.json()["error"]["message"]


def test_vllm_s_prompt_logprobs_field_lists_each_prompt_token_with_its_rank(shared_server, hf_smollm2) -> None:
    """vLLM's `prompt_logprobs` (completions: per choice; chats: once, at the top, over the templated prompt): null
    first, then per token its id's log-probability and rank and the top ones' (ranks 1..k), against transformers;
    refused streamed, out of range, or beside echo's logprobs with another count."""
    import httpx

    text = "Paris is the capital of"
    with httpx.Client(timeout=60) as http:
        model = http.get(f"{shared_server.http}/v1/models").json()["data"][0]["id"]
        ids = http.post(f"{shared_server.http}/tokenize", json={"prompt": text}).json()["tokens"]
        done = http.post(f"{shared_server.http}/v1/completions", json={
            "model": model, "prompt": text, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}).json()
        messages = [{"role": "user", "content": "Hi"}]
        chat_ids = http.post(f"{shared_server.http}/tokenize", json={"messages": messages}).json()["tokens"]
        chat = http.post(f"{shared_server.http}/v1/chat/completions", json={
            "model": model, "messages": messages, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 0}).json()
        bad = [http.post(f"{shared_server.http}/v1/completions", json={"model": model, "prompt": text, **change})
               for change in ({"prompt_logprobs": 1, "stream": True}, {"prompt_logprobs": 21},
                              {"echo": True, "logprobs": 2, "prompt_logprobs": 3})]
    for got, prompt_ids, k in ((done["choices"][0]["prompt_logprobs"], ids, 2), (chat["prompt_logprobs"], chat_ids, 0)):
        want = _hf_rows(hf_smollm2, prompt_ids, k)
        assert got[0] is None and len(got) == len(prompt_ids)
        for i, (entry, (logprob, top_ids, tops)) in enumerate(zip(got[1:], want, strict=True)):
            mine = entry[str(prompt_ids[i + 1])]
            assert abs(mine["logprob"] - logprob) < 2e-3 and mine["rank"] >= 1, i
            assert mine["rank"] == 1 + sum(t > logprob + 1e-3 for t in tops) or mine["rank"] > k, i
            for rank, (token, value) in enumerate(zip(top_ids, tops, strict=True), 1):
                assert str(token) in entry and abs(entry[str(token)]["logprob"] - value) < 2e-3, i
                assert entry[str(token)]["rank"] == rank or str(token) == str(prompt_ids[i + 1]), i
            assert len(entry) in (k, k + 1), i
    assert "logprobs" not in done["choices"][0] or done["choices"][0]["logprobs"] is None
    assert [r.status_code for r in bad] == [400, 400, 400] and all(r.json()["error"]["param"] == "prompt_logprobs"
                                                                   for r in bad)
