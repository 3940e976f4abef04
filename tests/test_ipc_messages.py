"""Message types and their msgpack codec: round trips, validation, and every way a frame can be bad."""

import dataclasses
import random

import msgpack
import pytest

from ipc import messages as m
from ipc.codec import MAX_FRAME_BYTES, decode, encode
from ipc.errors import HybridrtError, ProtocolError

SPEC = m.TensorSpec("logits", "float32", (1, 32000), "shm", "hybridrt-1-logits-abcd")
CUDA_SPEC = m.TensorSpec(
    "input_ids",
    "int64",
    (1,),
    "cuda_ipc",
    b"\x01" * 64,
    offset_bytes=512,
    device=0,
    extra={"storage_size_bytes": 1024, "ref_counter_handle": b"/torch_1", "event_sync_required": True},
)

SAMPLES = [
    m.Handshake(protocol_version=m.PROTOCOL_VERSION, role="jit_context", pid=1234),
    m.Ready(
        protocol_version=m.PROTOCOL_VERSION,
        model_name="SmolLM2-135M",
        vocab_size=49152,
        max_context=2048,
        dtype="float32",
        device="cpu",
        buffers=m.StepBufferSpecs(input_ids=CUDA_SPEC, next_token=CUDA_SPEC, logits=SPEC, batch_logits=SPEC,
                                  verify_logits=SPEC, token_ring=SPEC),
        max_num_seqs=4,
        eos_token_ids=[0, 2],
        events=m.EventHandles(executor=b"\x02" * 64, jit=b"\x03" * 64),
        tokenizer_path="/models/smollm2",
        facts={"startup_s": 1.5, "graphs": ["decode"], "nested": {"ok": None}},
    ),
    m.Status(),
    m.StatusReply(facts={"captured": 3, "pool_bytes": 1 << 40}),
    m.Ok(),
    m.Ok(request_id="r1"),
    m.Error(code="bad_fields", message="nope", request_id=None),
    m.Prefill(request_id="r1", step=0, num_tokens=17, start_pos=0),
    m.Decode(request_id="r1", step=2, position=20),
    m.Decode(request_id="r1", step=3, position=21, argmax=True, own_input=True),
    m.Prefill(request_id="b1", step=4, num_tokens=3, start_pos=9, slot=2),
    m.DecodeBatch(request_id="b1", step=5, slots=[2, 0, 3], positions=[12, 40, 7]),
    m.DecodeBatch(request_id="b2", step=6, slots=[2, 0], positions=[13, 41], chunk_tokens=[64], chunk_starts=[128],
                  chunk_slots=[1]),
    m.DecodeBatch(request_id="b3", step=7, slots=[0], positions=[14], chunk_tokens=[50, 30], chunk_starts=[0, 0],
                  chunk_slots=[3, 1]),
    m.Verify(request_id="r1", step=3, position=21, num_tokens=5),
    m.StepDone(request_id="r1", step=2),
    m.ScorePrompt(request_id="r1", step=4, num_tokens=40, start_pos=0, slot=1, logprobs=2, scored=39),
    m.StepDone(request_id="r1", step=4, logprobs=[-1.5, -0.25, -1.5, 7.0, 12.0]),
    m.Reset(request_id="r1"),
    m.GenerateRequest(request_id="c1", prompt="Hello", params={"temperature": 0.7, "max_tokens": 64}),
    m.GenerateRequest(request_id="c2", messages=[{"role": "user", "content": "Hi"}]),
    m.GenerateRequest(request_id="c4", messages=[{"role": "assistant", "content": "Once"}],
                      chat=m.ChatOptions(False, True, {"enable_thinking": False, "style": ["short"]})),
    m.GenerateRequest(request_id="c3", token_ids=[1, 2, 3]),
    m.TokenChunk(request_id="c1", text=" Paris", token_ids=[7042]),
    m.LogprobsChunk(request_id="c1", text=" Paris", token_ids=[7042],
                    logprobs=[m.TokenLogprob(7042, " Paris", -0.25, [7042, 12], [" Paris", " the"], [-0.25, -2.0])]),
    m.PromptLogprobsChunk(request_id="c1", text="", token_ids=[], start=1, first_text="The",
                          prompt_logprobs=[m.TokenLogprob(3681, " capital", -4.5, [1070], [" first"], [-1.25])]),
    m.Finished(
        request_id="c1",
        text="Paris.",
        token_ids=[7042, 13],
        finish_reason="stop",
        usage={"prompt_tokens": 5, "completion_tokens": 2},
        timings={"ttft_ms": 12.5},
    ),
    m.CancelRequest(request_id="c1"),
    m.TokenizeRequest(request_id="t1", prompt="héllo"),
    m.TokenizeRequest(request_id="t2", messages=[{"role": "user", "content": "hi"}], add_generation_prompt=False),
    m.TokenizeReply(request_id="t1", token_ids=[1, 2, 3], max_context=4096),
    m.DetokenizeRequest(request_id="d1", token_ids=[1, 2, 3]),
    m.DetokenizeReply(request_id="d1", text="héllo"),
    m.Started(request_id="c1", queue_ms=12.5),
]

FINISHED = next(s for s in SAMPLES if isinstance(s, m.Finished))


def frame(tag, fields) -> bytes:
    return msgpack.packb([tag, fields], use_bin_type=True)


def fields_of(msg) -> dict:
    return msgpack.unpackb(encode(msg))[1]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda msg: type(msg).__name__)
def test_round_trip(msg):
    back = decode(encode(msg))
    assert type(back) is type(msg)
    assert back == msg


def test_every_kind_has_a_unique_tag_and_a_sample():
    tags = [cls.TAG for cls in m.ALL_MESSAGES]
    assert len(set(tags)) == len(tags)
    assert set(m.MESSAGE_TYPES) == set(tags)
    assert {type(s) for s in SAMPLES} == set(m.ALL_MESSAGES)
    assert not hasattr(m.TensorSpec, "TAG")  # a value type, never a frame of its own


def test_nested_records_come_back_typed_with_tuple_shape():
    ready = decode(encode(SAMPLES[1]))
    assert isinstance(ready.buffers, m.StepBufferSpecs) and isinstance(ready.buffers.logits, m.TensorSpec)
    assert ready.buffers.logits.shape == (1, 32000)
    assert ready.buffers.input_ids.handle == b"\x01" * 64
    assert isinstance(ready.events, m.EventHandles) and ready.events.jit == b"\x03" * 64


def test_finish_reasons_are_one_closed_set():
    for reason in m.FinishReason.ALL:
        assert decode(encode(dataclasses.replace(FINISHED, finish_reason=reason))).finish_reason == reason
    with pytest.raises(ProtocolError, match="finish_reason"):
        decode(encode(dataclasses.replace(FINISHED, finish_reason="cancelled")))


@pytest.mark.parametrize(
    "build",
    [
        lambda: m.GenerateRequest(request_id="r"),  # none of prompt/messages/token_ids
        lambda: m.GenerateRequest(request_id="r", prompt="a", token_ids=[1]),  # two of them
        lambda: m.GenerateRequest(request_id="r", prompt="a", chat=m.ChatOptions()),  # chat options without messages
        lambda: m.GenerateRequest(request_id="r", messages=[], chat=m.ChatOptions(True, True)),  # both
        lambda: m.GenerateRequest(request_id="r", messages=[], chat=m.ChatOptions(template_kwargs={"tokenize": 1})),
        lambda: m.GenerateRequest(request_id="r", messages=[], chat=m.ChatOptions(template_kwargs={1: 2})),
        lambda: m.Decode(request_id="r", step=True, position=0),  # bool is not an int here
        lambda: m.Decode(request_id="r", step=0, position=-1),
        lambda: m.Verify(request_id="r", step=0, position=3, num_tokens=0),
        lambda: m.Decode(request_id="", step=0, position=0),
        lambda: m.Decode(request_id="x" * 1000, step=0, position=0),
        lambda: m.Prefill(request_id="r", step=0, num_tokens=0, start_pos=0),
        lambda: m.Prefill(request_id="r", step=0, num_tokens=1, start_pos=0, slot=-1),
        lambda: m.DecodeBatch(request_id="r", step=0, slots=[0, 0], positions=[1, 2]),  # a slot twice
        lambda: m.DecodeBatch(request_id="r", step=0, slots=[0, 1], positions=[1]),
        lambda: m.DecodeBatch(request_id="r", step=0, slots=[], positions=[]),
        lambda: m.DecodeBatch(request_id="r", step=0, slots=[0], positions=[-3]),
        lambda: m.DecodeBatch(request_id="r", step=0, slots=[0, 1], positions=[1, 2], chunk_tokens=[4],
                              chunk_starts=[0], chunk_slots=[1]),  # a chunk in a decoding slot
        lambda: m.DecodeBatch(request_id="r", step=0, slots=[0], positions=[1], chunk_tokens=[4, 4],
                              chunk_starts=[0, 0], chunk_slots=[1, 1]),  # two chunks of one slot
        lambda: m.DecodeBatch(request_id="r", step=0, slots=[0], positions=[1], chunk_tokens=[257], chunk_starts=[0],
                              chunk_slots=[1]),
        lambda: m.DecodeBatch(request_id="r", step=0, slots=[0], positions=[1], chunk_tokens=[200, 57],
                              chunk_starts=[0, 0], chunk_slots=[1, 2]),  # 257 in all
        lambda: m.DecodeBatch(request_id="r", step=0, slots=[0], positions=[1], chunk_tokens=[0], chunk_starts=[0],
                              chunk_slots=[1]),
        lambda: m.DecodeBatch(request_id="r", step=0, slots=[0], positions=[1], chunk_tokens=[4], chunk_starts=[0],
                              chunk_slots=[]),
        lambda: dataclasses.replace(SAMPLES[1], max_num_seqs=0),
        lambda: m.Error(code="x", message="y", request_id=5),
        lambda: m.StatusReply(facts={1: "int key"}),
        lambda: m.StatusReply(facts={"obj": object()}),
        lambda: m.TokenChunk(request_id="r", text="a", token_ids=[1, "2"]),
        lambda: m.GenerateRequest(request_id="r", token_ids=[1, 2, True]),  # the ids' one-pass check, then per id
        lambda: m.GenerateRequest(request_id="r", token_ids=[1, 2.0]),
        lambda: m.GenerateRequest(request_id="r", token_ids=[1, -2]),
        lambda: m.GenerateRequest(request_id="r", messages=[{"role": "user", "content": 1.5j}]),
        lambda: m.TokenizeRequest(request_id="r"),  # neither prompt nor messages
        lambda: m.TokenizeRequest(request_id="r", prompt="a", messages=[]),  # both
        lambda: m.DetokenizeRequest(request_id="r", token_ids=[-1]),
        lambda: m.TensorSpec("t", "float32", (2, -1), "shm", "seg"),
        lambda: m.TensorSpec("t", "float32", (2,), "nfs", "seg"),
        lambda: m.TensorSpec("t", "float32", (2,), "shm", b"bytes-for-shm"),
        lambda: m.TensorSpec("t", "float32", (2,), "cuda_ipc", b"handle"),  # no device
        lambda: dataclasses.replace(SAMPLES[1], buffers={"x": {"name": "not a spec"}}),
        lambda: dataclasses.replace(SAMPLES[1], events={"executor": b"x", "jit": b"y"}),
        lambda: dataclasses.replace(SAMPLES[1], buffers=m.StepBufferSpecs(SPEC, SPEC, SPEC, SPEC, SPEC, "not a spec")),
    ],
)
def test_invalid_fields_fail_validation(build):
    """Construction never checks (our own messages are built on the hot path); `validate` does, and decoding
    a frame from an untrusted peer runs it."""
    msg = build()
    with pytest.raises(ValueError):
        msg.validate()


def test_tensor_spec_accepts_list_shape():
    assert m.TensorSpec("t", "int64", [2, 3], "shm", "seg").shape == (2, 3)


def test_encode_rejects_non_messages_and_oversized():
    with pytest.raises(TypeError):
        encode(SPEC)
    big = m.TokenChunk(request_id="r", text="x" * 2000, token_ids=[])
    with pytest.raises(ProtocolError) as info:
        encode(big, max_frame_bytes=1000)
    assert info.value.code == "oversized"
    with pytest.raises(ValueError):
        encode(m.StatusReply(facts={"huge": 1 << 70}))


GOOD = encode(m.Decode(request_id="r", step=1, position=2))
BAD_FRAMES = {
    "empty": (b"", "malformed"),
    "not msgpack": (b"\xc1\xc1\xc1", "malformed"),
    "truncated": (GOOD[:-3], "malformed"),
    "trailing bytes": (GOOD + b"\x00", "malformed"),
    "not an array": (msgpack.packb({"tag": 11}), "malformed"),
    "array of 3": (msgpack.packb([11, {}, 0]), "malformed"),
    "str tag": (frame("Decode", {}), "malformed"),
    "bool tag": (frame(True, {}), "malformed"),
    "fields not a map": (frame(11, ["r", 1, 2]), "malformed"),
    "int map key": (frame(11, {1: 2}), "malformed"),
    "ext type": (frame(5, {"facts": {"x": msgpack.ExtType(1, b"pickle?")}}), "malformed"),
    "too deep": (b"\x91" * 5000 + b"\xc0", "malformed"),
    "unknown tag": (frame(999, {}), "unknown_type"),
    "negative tag": (frame(-1, {}), "unknown_type"),
    "missing field": (frame(11, {"request_id": "r", "step": 1}), "bad_fields"),
    "unknown field": (frame(11, {**fields_of(m.Decode("r", 1, 2)), "extra": 1}), "bad_fields"),
    "wrong type": (frame(11, {"request_id": "r", "step": "1", "position": 2}), "bad_fields"),
    "bad value": (frame(20, {"request_id": "r"}), "bad_fields"),
    "buffers not a map": (frame(2, {**fields_of(SAMPLES[1]), "buffers": 3}), "bad_fields"),
    "buffers missing one": (frame(2, {**fields_of(SAMPLES[1]), "buffers": {"logits": fields_of(SAMPLES[1])["buffers"]["logits"]}}),
                            "bad_fields"),
    "spec missing field": (
        frame(2, {**fields_of(SAMPLES[1]),
                  "buffers": {**fields_of(SAMPLES[1])["buffers"], "logits": {"name": "x"}}}),
        "bad_fields",
    ),
    "bad finish reason": (frame(22, {**fields_of(FINISHED), "finish_reason": "cancelled"}), "bad_fields"),
    "oversized": (b"\x00" * (MAX_FRAME_BYTES + 1), "oversized"),
}


@pytest.mark.parametrize("name", BAD_FRAMES)
def test_bad_frames_raise_protocol_error_with_code(name):
    data, code = BAD_FRAMES[name]
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert info.value.code == code
    assert isinstance(info.value, HybridrtError)


def test_frame_limit_is_configurable_per_call():
    assert decode(GOOD, max_frame_bytes=len(GOOD)) is not None
    with pytest.raises(ProtocolError, match="oversized"):
        decode(GOOD, max_frame_bytes=len(GOOD) - 1)


def test_huge_length_header_does_not_allocate():
    # A str header claiming 4 GiB in a 6-byte frame must fail fast, not try to allocate.
    with pytest.raises(ProtocolError):
        decode(b"\xdb\xff\xff\xff\xff" + b"a")
    with pytest.raises(ProtocolError):
        decode(b"\xdd\xff\xff\xff\xff")  # array32 of 4G elements


def test_fuzz_only_protocol_errors():
    rng = random.Random(0)
    valid = [encode(s) for s in SAMPLES]
    for _ in range(3000):
        if rng.random() < 0.5:
            data = rng.randbytes(rng.randrange(0, 64))
        else:  # flip a few bytes of a valid frame
            data = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        try:
            assert isinstance(decode(data), m.Message)
        except ProtocolError:
            pass


def test_protocol_error_codes_are_closed():
    with pytest.raises(ValueError):
        ProtocolError("whatever", "detail")


def test_trusted_decode_skips_value_checks_but_not_structure():
    """The control channel (our own two processes, after the handshake) decodes structurally only."""
    unchecked = frame(11, {"request_id": "r", "step": -1, "position": 2})
    with pytest.raises(ProtocolError):
        decode(unchecked)
    assert decode(unchecked, trusted=True) == m.Decode("r", -1, 2)
    for data, code in [(frame(11, {"request_id": "r"}), "bad_fields"), (frame(999, {}), "unknown_type"),
                       (b"\xc1", "malformed")]:
        with pytest.raises(ProtocolError) as info:
            decode(data, trusted=True)
        assert info.value.code == code
    # The session messages are checked in full even on a trusted channel: versions may differ there.
    bad_ready = frame(2, {**fields_of(SAMPLES[1]), "vocab_size": 0})
    with pytest.raises(ProtocolError, match="vocab_size"):
        decode(bad_ready, trusted=True)


def _reference_check(value, hint, where="x") -> None:
    """The annotation walk `check_type` did on every value before `fits` (kept here as the oracle)."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _reference_check(value, arm, where)
            except ValueError:
                pass
        raise ValueError(where)
    kind = origin or hint
    if kind is int or kind is float:
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(where)
    if hint is dict or hint is list:
        m._check_plain(value, where)
    elif kind is list or kind is tuple:
        for item in value:
            _reference_check(item, args[0], where)
    elif kind is dict:
        for key, item in value.items():
            _reference_check(key, args[0], where)
            _reference_check(item, args[1], where)


def _nested(depth: int, wrap=lambda value: [value]):
    value = 1
    for _ in range(depth):
        value = wrap(value)
    return value


def _nested_dict(depth: int):
    return _nested(depth, lambda value: {"k": value})


VALUES = [None, True, False, 0, 7, -3, 2**70, 1.5, float("nan"), "", "s", b"b", [], [1, 2], [1, True], [True],
          ["a", "b"], [1.5], [None], [[1]], [1, "a"], (1, 2), (), {}, {"a": 1}, {1: 2}, {"a": [1, {"b": None}]},
          {"a": object()}, [object()], object(), _nested(31), _nested(32), _nested(33), _nested(40),
          *(_nested_dict(d) for d in (31, 32, 33, 40)), *({"k": _nested(d)} for d in (30, 31, 32)),
          *([_nested_dict(d)] for d in (30, 31, 32)), m.ChatOptions(), SPEC]


def test_fits_agrees_with_the_annotation_walk_for_every_field():
    """`fits` (a predicate built once per annotation, the hot path of validation) accepts exactly what the
    annotation walk accepts, for every field of every message and record, over values of every shape the
    protocol meets (and some it must refuse); a refused value still gets the walk's error naming it."""
    hints = {hint for cls in [*m.MESSAGE_TYPES.values(), m.TensorSpec, m.StepBufferSpecs, m.EventHandles,
                              m.ChatOptions] for hint in m.field_types(cls).values()}
    assert len(hints) > 10
    for hint in hints:
        for value in VALUES:
            try:
                _reference_check(value, hint)
                want = True
            except ValueError:
                want = False
            assert m.fits(hint)(value) is want, (hint, value)
            if not want:
                with pytest.raises(ValueError, match="^where"):
                    m.check_type(value, hint, "where")
