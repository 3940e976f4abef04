"""Chat templates: compiled and rendered exactly as transformers does, without importing transformers (seconds of
imports at every JIT context start; jinja2 alone takes a tenth of that).

Mirrors transformers 5.x `utils/chat_template_utils.py` (`_cached_compile_jinja_template`, `render_jinja_template`)
and the template choice of `PreTrainedTokenizerBase.get_chat_template` (Apache-2.0, (c) The HuggingFace Team), for
one conversation with its tools (no documents or assistant masks): what `Tokenizer.apply_chat_template` asks for. A
change there is a change here: tests/test_tokenizer.py compares the two on assorted templates.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

# Appended to the message to continue, then cut from the rendered text with what follows it (transformers' tag).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Names a message's reasoning is passed under; the first is the one templates read (transformers' aliasing).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def check_chat_template(template: str) -> None:
    """ValueError unless `template` compiles in the environment it is rendered in (loop controls and
    `{% generation %}` included; an unknown filter is a compile error there too)."""
    import jinja2

    try:
        compile_chat_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the template does not compile: {e.message} (line {e.lineno})") from None


@lru_cache(maxsize=128)
def compile_chat_template(template: str):
    """The compiled template, once per template string (compiling takes ~5-13 ms; transformers caches it too)."""
    return _environment().from_string(template)


@lru_cache(maxsize=1)
def _environment():
    """transformers' chat template environment. It builds one per template; one shared is the same thing, as
    nothing a template does can change its (immutable, sandboxed) environment."""
    import jinja2
    import jinja2.exceptions
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from packaging import version

    if version.parse(jinja2.__version__) < version.parse("3.1.6"):
        # transformers' floor: older versions have known sandbox escapes, and chat templates come from the Hub.
        raise ImportError(f"chat templates need jinja2>=3.1.6, this is {jinja2.__version__}")

    class AssistantTracker(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks the assistant's tokens for transformers' assistant masks;
        # without a mask asked for (never here) it renders its body unchanged, which is all this one does.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

        @jinja2.pass_eval_context
        def _generation_support(self, context, caller) -> str:
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Not Jinja's own tojson: that one escapes HTML characters and takes no json.dumps options.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # `dict(...)` without the dict type itself, whose attributes a template could reach through.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # A namespace that refuses underscore-prefixed names (no way to CPython internals through it).
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]  # Jinja's signature trick, so that `namespace(self=...)` works
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                    "Please rename the attribute."
                )

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[AssistantTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def select_chat_template(own: str | dict[str, str] | None, given: str | None, tools: bool = False) -> str:
    """The template to render: `given` (a template, or the name of one of the tokenizer's), else the tokenizer's
    own, where it has several its "tool_use" one for a conversation with tools, else its "default". ValueError where
    there is none (transformers' rule and words)."""
    if isinstance(own, dict):
        if given is not None and given in own:
            return own[given]
        if given is None:
            if tools and "tool_use" in own:
                return own["tool_use"]
            if "default" in own:
                return own["default"]
            raise ValueError(
                "This model has multiple chat templates with no default specified! Please either pass a chat "
                "template or the name of the template you wish to use to the `chat_template` argument. Available "
                f"template names are {sorted(own.keys())}."
            )
        return given
    if given is not None:
        return given
    if own is not None:
        return own
    raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set and no template "
                     "argument was passed!")


# How a model writes a tool call, told by what its chat template shows it (the templates of Qwen2.5 / Hermes, of
# Llama 3.1-3.3, of Mistral's instruct models): the tool-call parser of the HTTP API (launch.tool_calls) for
# `tool_choice: "auto"`. A template that shows none of them gives no format: "auto" with tools is then refused.
TOOL_CALL_MARKERS = (("hermes", "<tool_call>"), ("mistral", "[TOOL_CALLS]"), ("llama3_json", "<|python_tag|>"),
                     ("llama3_json", '"parameters": dictionary of argument name'))
# Other formats behind the same markers, which those parsers do not read: XML-style calls after <tool_call>
# (Qwen3-Coder, GLM-4.5), Mistral's newer `[TOOL_CALLS]name[ARGS]{...}`.
_OTHER_FORMATS = ("<function=", "<arg_key>", "[ARGS]")


def tool_call_format(template: str | None) -> str | None:
    """The tool-call format a chat template teaches its model (TOOL_CALL_MARKERS), or None (also for a template that
    writes calls in another form behind the same marker)."""
    if not template or "tools" not in template or any(other in template for other in _OTHER_FORMATS):
        return None
    return next((name for name, marker in TOOL_CALL_MARKERS if marker in template), None)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = False,
                continue_final_message: bool | str = False, variables: dict[str, Any] | None = None) -> str:
    """`messages` through `template` as transformers' `apply_chat_template(..., tokenize=False)` renders them;
    `variables`: the rest of the template's context (the tokenizer's special tokens, then the caller's kwargs).
    ValueError for transformers' ValueErrors; the template's own failures raise jinja2's errors."""
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message and add_generation_prompt are not compatible. Use continue_final_message when you "
            "want the model to continue the final message, and add_generation_prompt when you want to add a header "
            "that will prompt it to start a new assistant message instead."
        )
    compiled = compile_chat_template(template)
    variables = _plain_template_data(variables or {})
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
    # Messages without their None values (templates handle a missing key better), then a fresh plain copy, which
    # the continuation tag below may be appended to without touching the caller's messages.
    chat = _plain_template_data([{k: v for k, v in m.items() if v is not None} for m in messages])
    chat = _alias_reasoning_fields(chat)
    final_message = None
    if continue_final_message:
        if not chat:
            raise ValueError("continue_final_message is set but the conversation is empty!")
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        if (final_message := chat[-1].get(field)) is None:
            raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue!')
        fields = [field]
        if field in _REASONING_FIELDS:
            fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final_message]
        if not any(f in template for f in fields):
            raise ValueError(f'continue_final_message is set to "{field}" but this is not an accepted field in the '
                             "chat_template")
        elif isinstance(final_message, (list, tuple)):
            for block in reversed(final_message):
                if "text" in block:  # the last text block
                    final_message = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ValueError("continue_final_message is set but we could not find any text to continue in the "
                                 "final message!")
        else:
            for f in fields:
                chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    tools = variables.pop("tools", None)  # (transformers' own argument: the tools' JSON schemas, as given)
    rendered = compiled.render(messages=chat, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
    if continue_final_message:
        if final_message.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
            raise ValueError(
                "continue_final_message is set but the final message does not appear in the chat after applying the "
                "chat template! This can happen if the chat template deletes portions of the final message. Please "
                "verify the chat template and final message in your chat to ensure they are compatible."
                f"Final message to continue: {final_message.strip()}\nRendered chat:\n{rendered}"
            )
        tag_at = rendered.rindex(_CONTINUE_TAG.strip())
        if rendered[tag_at:tag_at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:tag_at]  # the template kept the message's spacing
        else:
            rendered = rendered[:tag_at].rstrip()  # it trimmed trailing space: so must we
    return rendered


def _alias_reasoning_fields(chat: list) -> list:
    # Reasoning under an older name is also passed as `reasoning_content`, and as `thinking` (gpt-oss templates).
    aliased = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def _plain_template_data(value: Any) -> Any:
    """What a template may see: plain JSON-like data only (rich objects have methods the sandbox does not know are
    dangerous); anything else becomes a placeholder naming its type, as in transformers."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)  # subclasses (enums, ...) carry extra methods
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(v) for v in value)
    numpy = sys.modules.get("numpy")  # a numpy scalar exists only where numpy is imported already
    if numpy is not None and isinstance(value, numpy.generic):
        return _plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"
