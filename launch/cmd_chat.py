"""`hybridrt chat`: an interactive multi-turn chat that streams each reply and keeps the conversation.

Like `generate`, it starts an ephemeral pair of runtime processes, or talks to a running `hybridrt serve`
with `--connect`. Each turn sends the whole history (system message, earlier turns, the new user message),
so the model sees the conversation; `/reset` clears it, `/exit` or end of input (Ctrl-D) quits, and Ctrl-C
during a reply cancels that reply (the turn is dropped from the history) and returns to the prompt.
Replies go to stdout; notes and errors go to stderr; the `> ` prompt is shown only when stdin is a terminal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from ipc.errors import HybridrtError
from launch.options import (
    add_api_key_flag,
    add_model_flags,
    add_prefix_reuse_flag,
    add_sampling_flags,
    add_speculative_flags,
    add_step_timeout_flag,
    chat_template,
    load_config,
    sampling_params,
    server_address,
    speculative_config,
)

PROMPT = "> "
REPLY_ROOM_SHARE = 4  # history is trimmed to leave the reply its --max-tokens, at most a quarter of the context
COMMANDS = "/reset clears the history, /exit or Ctrl-D quits, Ctrl-C cancels a reply"
RECOVERABLE = {"invalid_request", "generation_failed"}  # error codes after which the server still serves


def register(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat with streaming replies",
                       description="Chat with a model, one turn per line, replies streamed. " + COMMANDS + ".")
    p.add_argument("--system", default=None, help="system message at the start of the conversation")
    p.add_argument("--connect", metavar="ADDR", default=None, type=server_address,
                   help="address of a running `hybridrt serve` (e.g. tcp://127.0.0.1:7461); the model flags "
                        "are then ignored")
    add_step_timeout_flag(p, note="; not used with --connect")
    add_prefix_reuse_flag(p)
    add_api_key_flag(p)
    add_sampling_flags(p, default_temperature=0.7)
    add_speculative_flags(p)
    add_model_flags(p)
    p.set_defaults(run=run)


@dataclass
class Conversation:
    """The chat history: an optional system message, then alternating user / assistant turns."""

    system: str | None = None
    turns: list[dict] = field(default_factory=list)

    def messages(self, user_text: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + self.turns + [{"role": "user", "content": user_text}]

    def add(self, user_text: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]

    def drop_oldest(self) -> bool:
        """Forget the oldest exchange (to fit the context); False when there is none."""
        if not self.turns:
            return False
        del self.turns[:2]
        return True

    def reset(self) -> None:
        self.turns.clear()


def run(args: argparse.Namespace) -> int:
    from launch.client import Client
    from launch.supervisor import ServerConfig, Supervisor

    params = sampling_params(args)  # validate flags before the (slow) model load
    speculation = speculative_config(args)
    supervisor = None
    if args.connect is None:
        supervisor = Supervisor(ServerConfig(load_config(args), tokenizer=args.tokenizer,
                                             chat_template=chat_template(args),
                                             step_timeout_s=args.step_timeout, speculation=speculation,
                                             draft_model=args.draft_model, prefix_reuse=not args.no_prefix_reuse))
        supervisor.start()
    try:
        with Client(args.connect or supervisor.address, api_key=args.api_key) as client:
            facts = supervisor.wait_ready() if supervisor else client.status()
            if not facts.get("chat_template"):
                raise HybridrtError(f"model {facts.get('model')} has no chat template; use "
                                    "`hybridrt generate --no-chat-template` for raw completion")
            if not args.quiet:
                note(f"chatting with {facts.get('model')} ({COMMANDS})")
            check = supervisor.check_children if supervisor else (lambda: None)
            return repl(client, Conversation(args.system), params, sys.stdin.isatty(), check,
                        int(facts.get("max_context") or 0))
    finally:
        if supervisor:
            supervisor.stop()


def repl(client, conversation: Conversation, params, interactive: bool, check: Callable[[], None],
         max_context: int = 0) -> int:
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while (line := read_line(interactive)) is not None:
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            conversation.reset()
            note("history cleared")
            continue
        if text.startswith("/"):
            note(f"unknown command {text.split()[0]} ({COMMANDS})")
            continue
        check()  # an ephemeral server whose process died: stop here with its reason
        chat_turn(client, conversation, text, params, max_context)
    return 0


def read_line(interactive: bool) -> str | None:
    """The next input line, None at end of input; Ctrl-C at the prompt just discards the line."""
    try:
        if interactive:
            return input(PROMPT)
        line = sys.stdin.readline()
        return line if line else None
    except EOFError:
        sys.stdout.write("\n")
        return None
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return ""


def reply_room(params, max_context: int) -> int:
    """Tokens of context the history leaves free for the reply: its --max-tokens, at most a quarter of the context."""
    return max(1, min(params.max_tokens, max_context // REPLY_ROOM_SHARE))


def fit_history(client, conversation: Conversation, text: str, params, max_context: int) -> int:
    """Drop the oldest exchanges until the prompt leaves the reply its room (`reply_room`); how many were dropped.
    With no history left, the new message goes as it is (the server refuses it if it alone is too long)."""
    dropped = 0
    while conversation.turns:
        prompt_tokens = len(client.tokenize(messages=conversation.messages(text)))
        if prompt_tokens + reply_room(params, max_context) <= max_context:
            break
        conversation.drop_oldest()
        dropped += 1
    return dropped


def length_note(reply_tokens: int, params, max_context: int) -> str:
    """What cut a reply that ended for its length: --max-tokens, or the context filling up."""
    if reply_tokens >= params.max_tokens:
        return f"(reply cut at the --max-tokens limit of {params.max_tokens} tokens)"
    return (f"(reply cut at the context limit of {max_context} tokens: /reset, or a shorter message, leaves it "
            "more room)")


def chat_turn(client, conversation: Conversation, text: str, params, max_context: int = 0) -> None:
    """Stream one reply and add the exchange to the history. The oldest exchanges go first while the history does
    not leave the reply its room (or, without the context size, while the server refuses the prompt)."""
    from launch.client import ServerError

    if max_context and fit_history(client, conversation, text, params, max_context):
        note("(dropped the oldest turns to leave room for the reply)")
    while True:
        try:
            finished = stream_reply(client, conversation.messages(text), params)
        except ServerError as e:
            if e.code == "invalid_request" and "maximum context" in str(e) and conversation.drop_oldest():
                note("(dropped the oldest turn to fit the context)")
                continue
            if e.code not in RECOVERABLE:
                raise
            note(f"error: {e}")
            return
        if finished is not None:
            if finished.finish_reason == "length":
                note(length_note(len(finished.token_ids), params, max_context))
            conversation.add(text, finished.text)
        return


def stream_reply(client, messages: list[dict], params):
    """The reply's Finished message (its text streamed to stdout as it came); None if Ctrl-C cancelled it."""
    stream = client.generate(messages=messages, params=params)
    try:
        for msg in stream:
            if hasattr(msg, "finish_reason"):
                sys.stdout.write("\n")
                sys.stdout.flush()
                return msg
            sys.stdout.write(msg.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        note("[cancelled]")
        return None
    finally:
        stream.close()  # if cut short: tells the server to stop generating this reply
    raise HybridrtError("the reply stream ended without a Finished message")


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
