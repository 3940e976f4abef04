"""Tokenizer wrapper: loading (GGUF and folder), chat template vs transformers, eos ids, errors; the
tokenizers-only load of generic fast tokenizer folders against transformers' load of the same folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from ipc.errors import HybridrtError, ModelLoadError
from jit_context.fast_tokenizer import FastBackend
from jit_context.tokenizer import Tokenizer, _HfBackend

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 日本"},
]


@pytest.fixture(scope="module")
def tok(gguf_tokenizer) -> Tokenizer:
    """Loaded from the GGUF file (conftest: one load per session, shared with test_detokenizer.py)."""
    return gguf_tokenizer


@pytest.fixture(scope="module")
def hf_reference(default_model_dir):
    """transformers' own tokenizer for the default model, from the converted folder that servers load it from (a
    second load from the GGUF would go through the same transformers code as `tok`, for seconds more)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.mark.parametrize("messages", [CONVERSATION, [{"role": "user", "content": "hi"}]], ids=["multi", "one"])
def test_chat_template_matches_transformers(tok, hf_reference, messages):
    expected = hf_reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.apply_chat_template(messages)
    assert ids == hf_reference.encode(expected, add_special_tokens=False)
    assert ids == list(hf_reference.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    assert tok.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty"),
        ({"role": "user", "content": "hi"}, "list"),
        (["hi"], r"messages\[0\]"),
        ([{"role": "tool", "content": "x"}], "role"),
        ([{"content": "x"}], "role"),
        ([{"role": "user", "content": None}], "content"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "content"),
        ([{"role": "user", "content": "x", "name": "bob"}], "name"),
    ],
)
def test_bad_messages_rejected(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_converted_folder_gives_the_gguf_tokenizer(tok, default_model_dir):
    """The default model's converted folder (tokenizer written and read as the generic fast class, without
    AutoTokenizer's lookups) tokenizes as AutoTokenizer's load of the GGUF does."""
    folder = Tokenizer.from_path(default_model_dir)
    texts = ["Hello world", "  leading spaces, tabs\tand\nnewlines", "Ünïcödé — emoji 🙂 and 中文",
             "<|im_start|>user\nhi<|im_end|>", "numbers 1234567890 and code: def f(x): return x**2"]
    for text in texts:
        assert folder.encode(text) == tok.encode(text), text
        assert folder.decode(tok.encode(text), skip_special_tokens=False) == tok.decode(tok.encode(text), False)
    assert folder.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)
    assert (folder.vocab_size, folder.eos_token_ids) == (tok.vocab_size, tok.eos_token_ids)


def test_encode_decode_vocab_and_eos(tok):
    ids = tok.encode("Hello world")
    assert 1 not in ids  # SmolLM2 (add_bos_token false) puts no <|im_start|> BOS on plain text
    assert tok.decode(ids) == "Hello world"
    assert tok.vocab_size == 49152
    assert tok.eos_token_ids == frozenset({2, 0})  # <|im_end|> (configured eos) and <|endoftext|>
    assert tok.has_chat_template
    with pytest.raises(ValueError, match="text"):
        tok.encode(["Hello"])


def test_save_round_trip_and_missing_chat_template(tok, tmp_path):
    tok.save(tmp_path)
    reloaded = Tokenizer.from_path(tmp_path)
    assert reloaded.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)
    assert reloaded.eos_token_ids == tok.eos_token_ids
    # Strip the template both where transformers 5 writes it and where older versions did.
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    bare = Tokenizer.from_path(tmp_path)
    assert not bare.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_load_errors_are_model_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Tokenizer.from_path(tmp_path / "missing")
    with pytest.raises(ModelLoadError):
        Tokenizer.from_path(tmp_path)  # an empty folder
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match="gguf"):
        Tokenizer.from_path(not_gguf)
    corrupt = tmp_path / "model.gguf"
    corrupt.write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(HybridrtError):
        Tokenizer.from_path(corrupt)


PLAIN_TEMPLATE = ("{%- for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}[assistant]{% endif %}")


def test_chat_template_override(tok, tmp_path) -> None:
    """--chat-template: the given template formats the messages instead of the tokenizer's own."""
    tok.save(tmp_path)  # its own instance (from a folder: fast): the override must not leak into other tests
    tok = Tokenizer.from_path(tmp_path)
    own = tok.apply_chat_template(CONVERSATION)
    tok.use_chat_template(PLAIN_TEMPLATE)
    rendered = "".join(f"[{m['role']}] {m['content']}\n" for m in CONVERSATION) + "[assistant]"
    assert tok.apply_chat_template(CONVERSATION) == tok.encode(rendered) != own
    with pytest.raises(ValueError, match="does not compile"):
        tok.use_chat_template("{% for %}")
    assert tok.apply_chat_template(CONVERSATION) == tok.encode(rendered)  # a bad one leaves the last good one


def test_chat_template_kwargs_and_continue_final_message(tok) -> None:
    """Template variables reach the template; continue_final_message leaves the last (assistant) message open."""
    from jit_context.tokenizer import Tokenizer

    own = Tokenizer(tok._backend)  # the shared instance stays as it is
    own.use_chat_template("{{ flavour | default('plain') }}:{% for m in messages %}[{{ m.role }}] {{ m.content }}"
                          "{% if not loop.last or add_generation_prompt %}<|im_end|>{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello th"}]
    assert own.decode(own.apply_chat_template(messages[:1], template_kwargs={"flavour": "SPICY"}),
                      skip_special_tokens=False).startswith("SPICY:")
    assert own.decode(own.apply_chat_template(messages[:1]), skip_special_tokens=False).startswith("plain:")
    opened = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    closed = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert tok.decode(opened, skip_special_tokens=False).endswith("Hello th")
    assert len(opened) < len(closed) and closed[:len(opened)] == opened
    with pytest.raises(ValueError, match="assistant"):
        tok.apply_chat_template(messages[:1], add_generation_prompt=False, continue_final_message=True)


# --- The tokenizers-only load (no transformers import) against transformers' load of the same folder ---

TEXTS = ["Hello world", "  leading  spaces,\ttabs\n\n newlines   \n", "Ünïcödé — emoji 🙂 and 中文, e\u0301",
         "<|im_start|>user\nhi<|im_end|> x<|im_end|>y", "<|endoftext|>", "", " ",
         "numbers 1234567890 and code: f(x)**2"]
CONVERSATIONS = {
    "multi": CONVERSATION,
    "one": [{"role": "user", "content": "hi"}],
    "open": [{"role": "user", "content": "Héllo  \n\t <|im_end|> {{ not jinja }}"},
             {"role": "assistant", "content": "Sure, th "}],
}
CUSTOM_TEMPLATES = {
    "tojson": ("{{ messages | tojson }}|{{ messages[-1] | tojson(indent=2) }}|"
               "{{ {'b': 'é 日本', 'a': '<&>'} | tojson(sort_keys=True, separators=(',', ':')) }}"),
    "loop_controls": ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }}"
                      "{% if loop.index > 2 %}{% break %}{% endif %}\n{% endfor %}"),
    "whitespace": ("{%- for m in messages %}\n  {{- bos_token + m.role }}\n    {% if true %}  {{ m.content }}"
                   "{% endif %}\n{% endfor -%}\n{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ sep_token }}"),
    "trimmed": "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>{% endfor %}",
    "strftime_now": "{{ strftime_now('%Y') | length }}|{{ messages[0]['content'] }}",
    "namespace_dict": ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                       "{{ ns.n }}{{ dict(a=1) | tojson }}{{ add_generation_prompt }}{{ tools }}{{ documents }}"),
    "generation": ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                   "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"),
    "kwargs": "{{ flavour | default('plain') }} {{ enable_thinking }} {{ bos_token }}{{ messages[-1].content }}",
    "raise_exception": ("{% if messages | length > 1 %}{{ raise_exception('too many: ' ~ messages | length) }}"
                        "{% endif %}{{ messages[0].content }}"),
    "undefined": "{{ messages[0].content.nope.deeper }}",
    "no_content_field": "{% for m in messages %}{{ m['role'] }}{% endfor %}",
    "sandbox": "{{ messages.__class__.__mro__ }}",
}


@pytest.fixture(scope="module")
def fast(default_model_dir) -> Tokenizer:
    """The converted default model's folder, loaded without transformers (shared: use your own instance,
    `Tokenizer(fast._backend)`, for anything that changes it)."""
    tok = Tokenizer.from_path(default_model_dir)
    assert isinstance(tok._backend, FastBackend)
    return tok


@pytest.fixture(scope="module")
def reference(hf_reference) -> Tokenizer:
    """Our wrapper around transformers' AutoTokenizer of the same folder (same sharing rule as `fast`)."""
    return Tokenizer(_HfBackend(hf_reference))


def _outcome(call):
    try:
        return call()
    except ValueError as e:
        return f"ValueError: {e}"


def test_the_default_folder_loads_without_transformers(default_model_dir) -> None:
    """What the JIT context does at start (imports while it waits, load, warm-up) imports no transformers."""
    code = ("import sys; from jit_context.tokenizer import Tokenizer, import_tokenizer_modules;"
            "import_tokenizer_modules(); tok = Tokenizer.from_path(sys.argv[1]); tok.warm_up();"
            "ids = tok.apply_chat_template([{'role': 'user', 'content': 'hi'}]);"
            "assert tok.decode(ids, skip_special_tokens=False).endswith('<|im_start|>assistant\\n'), ids;"
            "assert tok.decode(tok.encode('Hello world')) == 'Hello world';"
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    result = subprocess.run([sys.executable, "-c", code, str(default_model_dir)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def test_fast_encode_decode_vocab_and_eos_match_transformers(fast, reference, hf_reference) -> None:
    for text in TEXTS:
        ids = fast.encode(text)
        assert ids == hf_reference.encode(text), text
        with_specials = ids + [0, 1, 2, 17]
        for skip in (True, False):
            expected = hf_reference.decode(with_specials, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            assert fast.decode(with_specials, skip_special_tokens=skip) == expected, (text, skip)
    assert fast.vocab_size == len(hf_reference) == 49152
    assert fast.eos_token_ids == reference.eos_token_ids == frozenset({0, 2})
    assert fast.has_chat_template and fast._backend.chat_template == hf_reference.chat_template


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_fast_chat_template_matches_transformers(fast, reference, hf_reference, name) -> None:
    messages = CONVERSATIONS[name]
    for add_generation_prompt in (True, False):
        ids = fast.apply_chat_template(messages, add_generation_prompt)
        assert ids == reference.apply_chat_template(messages, add_generation_prompt)
        assert ids == list(hf_reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                            tokenize=True, return_dict=False))
    kwargs = {"flavour": "x", "enable_thinking": False, "bos_token": "<override>"}
    assert fast.apply_chat_template(messages, template_kwargs=kwargs) == \
        reference.apply_chat_template(messages, template_kwargs=kwargs)
    if messages[-1]["role"] == "assistant":
        ids = fast.apply_chat_template(messages, False, continue_final_message=True)
        assert ids == reference.apply_chat_template(messages, False, continue_final_message=True)
        assert fast.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\nSure, th ")
    # transformers' own refusal, word for word, through both.
    both = [_outcome(lambda t=t: t.apply_chat_template(messages, True, continue_final_message=True))
            for t in (fast, reference)]
    assert both[0] == both[1] and both[0].startswith("ValueError")


@pytest.mark.parametrize("name", sorted(CUSTOM_TEMPLATES))
def test_custom_templates_render_as_in_transformers(fast, reference, name) -> None:
    """--chat-template templates through the tokenizers-only path and through transformers: the same ids, or the
    same ValueError (the template's own failures included)."""
    ours, theirs = Tokenizer(fast._backend), Tokenizer(reference._backend)
    for tok in (ours, theirs):
        tok.use_chat_template(CUSTOM_TEMPLATES[name])
    variables = {"flavour": "spicy", "enable_thinking": True}
    cases = [(messages, {"add_generation_prompt": agp, "template_kwargs": variables})
             for messages in CONVERSATIONS.values() for agp in (True, False)]
    cases.append((CONVERSATIONS["open"], {"add_generation_prompt": False, "continue_final_message": True}))
    failed = []
    for messages, kwargs in cases:
        got = _outcome(lambda m=messages, k=kwargs: ours.apply_chat_template(m, **k))
        assert got == _outcome(lambda m=messages, k=kwargs: theirs.apply_chat_template(m, **k)), (messages, kwargs)
        if isinstance(got, str) and not kwargs.get("continue_final_message"):
            failed.append(got)  # continuing fails for templates that drop or never name the final content
    assert bool(failed) == (name in ("raise_exception", "undefined", "sandbox")), failed


def test_loop_controls_and_generation_tags_pass_the_check(fast) -> None:
    """check_chat_template compiles in the rendering environment: what renders is accepted (it parsed with a
    plain Jinja environment before, which rejected {% break %})."""
    from jit_context.tokenizer import check_chat_template

    check_chat_template(CUSTOM_TEMPLATES["loop_controls"])
    check_chat_template(CUSTOM_TEMPLATES["generation"])
    with pytest.raises(ValueError, match="does not compile"):
        check_chat_template("{{ x | no_such_filter }}")


def _variant(source, folder, config_edit) -> None:
    """`folder`: the default model's tokenizer.json with an edited tokenizer_config.json and no chat_template.jinja
    (the template, where kept, moves into the config)."""
    folder.mkdir()
    shutil.copyfile(source / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = (source / "chat_template.jinja").read_text()
    config_edit(config, json.loads((source / "tokenizer.json").read_text())["added_tokens"])
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _transformers4_style(config: dict, added: list[dict]) -> None:
    """As transformers 4 wrote configs: AddedToken dicts, added_tokens_decoder, additional_special_tokens, and
    tokens that the tokenizer has not got (added after its vocabulary, in transformers' order)."""
    config.update(
        tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=True,
        eos_token={"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
                   "rstrip": False, "single_word": False, "special": True},
        pad_token="<pad>", image_token="<image>", additional_special_tokens=["<extra_1>", "<|im_end|>"],
        added_tokens_decoder={**{str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added},
                              "49152": {"content": "<new>", "lstrip": False, "rstrip": False, "normalized": True,
                                        "single_word": False, "special": False}})


def _template_list(config: dict, added: list[dict]) -> None:
    config["chat_template"] = [{"name": "tool_use", "template": "tools!"},
                               {"name": "default", "template": config["chat_template"]}]


@pytest.mark.parametrize("edit", [_transformers4_style, _template_list], ids=["transformers4", "template_list"])
def test_config_variants_load_as_in_transformers(default_model_dir, tmp_path, edit) -> None:
    from transformers import AutoTokenizer

    _variant(default_model_dir, tmp_path / "tok", edit)
    ours = Tokenizer.from_path(tmp_path / "tok")
    assert isinstance(ours._backend, FastBackend)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    theirs = Tokenizer(_HfBackend(hf))
    text = "<pad> <image> <extra_1> <new> <|im_end|> plain"
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip) == theirs.decode(ids, skip)
    assert (ours.vocab_size, ours.eos_token_ids) == (len(hf), theirs.eos_token_ids)
    assert ours._backend._special_tokens_map == hf.special_tokens_map
    for messages in CONVERSATIONS.values():
        assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages)


def test_fast_save_round_trip_and_fallbacks(fast, default_model_dir, tmp_path) -> None:
    """The fast backend saves the files it loaded (reloaded identically, on either path); a corrupt tokenizer.json
    is a ModelLoadError; what it does not mirror (legacy special_tokens_map.json) goes to transformers."""
    fast.save(tmp_path / "saved")
    reloaded = Tokenizer.from_path(tmp_path / "saved")
    assert isinstance(reloaded._backend, FastBackend)
    assert reloaded.apply_chat_template(CONVERSATION) == fast.apply_chat_template(CONVERSATION)
    assert (reloaded.vocab_size, reloaded.eos_token_ids) == (fast.vocab_size, fast.eos_token_ids)
    reloaded.save(tmp_path / "saved")  # over its own files: nothing to trip over
    assert Tokenizer.from_path(tmp_path / "saved").encode(TEXTS[3]) == fast.encode(TEXTS[3])
    (tmp_path / "saved" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    legacy = Tokenizer.from_path(tmp_path / "saved")
    assert isinstance(legacy._backend, _HfBackend)
    assert legacy.encode(TEXTS[3]) == fast.encode(TEXTS[3])
    (tmp_path / "saved" / "special_tokens_map.json").unlink()
    (tmp_path / "saved" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_path(tmp_path / "saved")


HERMES_TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:\n<tools>{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    "</tools>\nReturn <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant"
    "{%- for tc in m.tool_calls %}\n<tool_call>{\"name\": \"{{ tc.function.name }}\", \"arguments\": "
    "{{ tc.function.arguments | tojson }}}</tool_call>{%- endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_tools_and_tool_messages_render_as_in_transformers(fast, reference) -> None:
    """The `tools` variable (OpenAI's tool entries) and assistant tool calls / tool results, through the
    tokenizers-only path and through transformers: the same ids; the template's tool-call format is found."""
    from jit_context.chat_template import tool_call_format

    ours, theirs = Tokenizer(fast._backend), Tokenizer(reference._backend)
    for tok in (ours, theirs):
        tok.use_chat_template(HERMES_TOOLS_TEMPLATE)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    got = ours.apply_chat_template(messages, tools=tools)
    assert got == theirs.apply_chat_template(messages, tools=tools)
    text = ours.decode(got, skip_special_tokens=False)
    assert '"name": "get_weather"' in text and '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}' \
        in text and "<tool_response>18 C</tool_response>" in text
    assert ours.apply_chat_template(messages[:1]) != ours.apply_chat_template(messages[:1], tools=tools)
    assert ours.tool_call_format == "hermes" and fast.tool_call_format is None
    assert tool_call_format("{% for t in tools %}{% endfor %}[TOOL_CALLS]") == "mistral"
    assert tool_call_format("<|python_tag|> without the variable") is None
    for bad, message in [({"role": "user", "content": None}, "content must be a string"),
                         ({"role": "user", "content": "x", "tool_calls": []}, "on an assistant message"),
                         ({"role": "assistant", "content": "x", "tool_call_id": "c"}, "only a tool message"),
                         ({"role": "tool", "content": "x"}, "needs the tool_call_id")]:
        with pytest.raises(ValueError, match=message):
            ours.apply_chat_template([bad])


def test_a_conversation_with_tools_renders_the_tool_use_template(default_model_dir, tmp_path) -> None:
    """A tokenizer with "default" and "tool_use" templates: with tools both paths render "tool_use" (transformers'
    choice), without them "default"; the tool-call format is the tool_use template's."""
    def two_templates(config: dict, added: list[dict]) -> None:
        config["chat_template"] = [{"name": "tool_use", "template": HERMES_TOOLS_TEMPLATE},
                                   {"name": "default", "template": config["chat_template"]}]

    _variant(default_model_dir, tmp_path / "tok", two_templates)
    from transformers import AutoTokenizer

    ours = Tokenizer.from_path(tmp_path / "tok")
    theirs = Tokenizer(_HfBackend(AutoTokenizer.from_pretrained(str(tmp_path / "tok"))))
    assert isinstance(ours._backend, FastBackend) and ours.tool_call_format == "hermes"
    tools = [{"type": "function", "function": {"name": "f"}}]
    messages = [{"role": "user", "content": "hi"}]
    with_tools = ours.apply_chat_template(messages, tools=tools)
    assert with_tools == theirs.apply_chat_template(messages, tools=tools)
    assert "<tools>" in ours.decode(with_tools, skip_special_tokens=False)
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages) != with_tools
