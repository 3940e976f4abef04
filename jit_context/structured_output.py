"""Structured output: what a request's reply must match, one immutable dataclass and its wire (dict) form.

One of vLLM's forms (its `structured_outputs` / `guided_*` params, OpenAI's `response_format`): a JSON schema, any
JSON object, a regular expression, one of fixed strings, or a grammar (Lark as llguidance reads it, or llama.cpp's
GBNF). `grammar_text` turns it into llguidance's grammar; `jit_context.grammar_mask` holds a reply to it, token by
token. Checked here: the form; checked by llguidance when the JIT context admits the request: the content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from jit_context.quoting import quote

MAX_SPEC_CHARS = 100_000  # a schema, regex or grammar; more is a client's mistake, not a reply's shape
MAX_CHOICES = 1024
FORMS = ("json", "json_object", "regex", "choice", "grammar")
JSON_OPTIONS = {"whitespace_flexible": False}  # llguidance's JSON compile options (its `x-guidance` in a schema wins)


@dataclass(frozen=True)
class StructuredOutput:
    """Exactly one of: `json` (a JSON schema, as JSON text), `json_object` (any JSON object), `regex`, `choice` (the
    reply is one of these strings), `grammar` (Lark, or GBNF when it has `::=` rules)."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] = ()
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in FORMS if getattr(self, name) not in (None, False, ())]
        if len(given) != 1:
            raise ValueError(f"structured output takes exactly one of {', '.join(FORMS)}, got "
                             f"{', '.join(given) if given else 'none'}")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured output json_object must be a bool, got {quote(self.json_object)}")
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise ValueError(f"structured output {name} must be a non-empty string, got {quote(value)}")
            if len(value) > MAX_SPEC_CHARS:
                raise ValueError(f"structured output {name} is {len(value)} characters, more than {MAX_SPEC_CHARS}")
        if self.json is not None:
            try:
                schema = json.loads(self.json)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"structured output json must be a JSON schema: {e}") from None
            if not isinstance(schema, dict):  # (true / false are schemas too, but not of a reply)
                raise ValueError(f"structured output json must be a JSON schema (an object), got {quote(schema)}")
        self._check_choice()

    def _check_choice(self) -> None:
        if not isinstance(self.choice, tuple):
            raise ValueError(f"structured output choice must be a tuple of strings, got {type(self.choice).__name__}")
        if len(self.choice) > MAX_CHOICES:
            raise ValueError(f"structured output choice holds {len(self.choice)} strings, more than {MAX_CHOICES}")
        if sum(len(c) for c in self.choice if isinstance(c, str)) > MAX_SPEC_CHARS:
            raise ValueError(f"structured output choice holds more than {MAX_SPEC_CHARS} characters")
        for c in self.choice:
            if not isinstance(c, str) or not c:
                raise ValueError(f"structured output choice must hold non-empty strings, got {quote(c)}")

    @property
    def form(self) -> str:
        """Which form this is (one of FORMS)."""
        return next(name for name in FORMS if getattr(self, name) not in (None, False, ()))

    def checked_grammar(self, tokenizer=None, limits=None) -> str:
        """llguidance's grammar for this form, checked by llguidance: without a tokenizer (the launcher's check), or
        against its vocabulary too (`tokenizer`, an LLTokenizer: special tokens the grammar names, token ranges;
        `limits`: its LLParserLimits); ValueError naming what is wrong (a bad schema, regex or rule)."""
        from llguidance import LLMatcher

        try:
            grammar = self.grammar_text()
        except (ValueError, RecursionError) as e:  # llguidance's own reading of a schema or a grammar
            raise ValueError(f"structured output {self.form}: {one_line(str(e))}") from None
        error = LLMatcher.validate_grammar(grammar, tokenizer, limits=limits)
        if error:
            raise ValueError(f"structured output {self.form}: {one_line(error)}")
        return grammar

    def grammar_text(self) -> str:
        """llguidance's grammar for this form (its JSON text), unchecked but for what llguidance cannot read at all
        (a ValueError: a GBNF grammar without a root rule, a schema it cannot apply its options to);
        `checked_grammar` checks the rest."""
        from llguidance import LLMatcher, grammar_from

        if self.json is not None or self.json_object:
            # One way to write the JSON (llguidance's compact separators), not any whitespace between tokens: a small
            # model given the choice runs into whitespace until max_tokens (seen with random weights at once).
            return LLMatcher.grammar_from_json_schema(self.json or '{"type": "object"}', JSON_OPTIONS)
        if self.regex is not None:
            return grammar_from("regex", self.regex)
        if self.choice:
            return grammar_from("choice", json.dumps(list(self.choice), ensure_ascii=False))
        return grammar_from("grammar", self.grammar)

    @classmethod
    def from_dict(cls, d: Any) -> StructuredOutput:
        """From a wire dict: unknown keys are an error, a schema may come as an object (it is kept as JSON text),
        choice as a list."""
        if not isinstance(d, dict):
            raise ValueError(f"structured output must be a dict, got {quote(d)}")
        unknown = sorted(str(k) for k in d if k not in FORMS)
        if unknown:
            raise ValueError(f"unknown structured output keys: {quote(', '.join(unknown))} (known: {', '.join(FORMS)})")
        kwargs = {k: v for k, v in d.items() if v is not None}
        if isinstance(kwargs.get("json"), (dict, bool)):
            try:
                kwargs["json"] = json.dumps(kwargs["json"])
            except (ValueError, RecursionError) as e:
                raise ValueError(f"structured output json must be a JSON schema: {e}") from None
        if isinstance(kwargs.get("choice"), list):
            kwargs["choice"] = tuple(kwargs["choice"])
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """Wire form: the one form given, plain types."""
        value = getattr(self, self.form)
        return {self.form: list(value) if isinstance(value, tuple) else value}


def one_line(error: str) -> str:
    """llguidance's error on one line: its lines joined, without the echo of the grammar's source, the caret under
    it (the message names the place) and its <non-verbose/> tag."""
    lines = [line.strip() for line in error.splitlines()]
    return " ".join(line for line in lines
                    if line and line not in ("^", "<non-verbose/>") and not re.match(r"\d+ \|", line))
