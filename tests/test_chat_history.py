"""`hybridrt chat`'s history against a running server: trimming that leaves the reply its room, and the note that
says which limit cut a reply (the REPL's functions driven in-process; the CLI's own process is test_chat.py's)."""

from __future__ import annotations


def test_history_is_trimmed_to_leave_the_reply_room_and_the_note_names_the_limit(shared_server, capsys) -> None:
    """Against the shared server (its tokenizer counts the prompt): the oldest exchanges go until the prompt leaves
    the reply its --max-tokens (at most a quarter of the context), and no more than that; a reply cut for length
    says whether --max-tokens or the context cut it."""
    from jit_context.sampling_params import SamplingParams
    from launch.client import Client
    from launch.cmd_chat import Conversation, chat_turn, fit_history, length_note, reply_room

    with Client(shared_server.address) as client:
        max_context = client.status()["max_context"]
        params = SamplingParams(max_tokens=max_context, temperature=0.0)  # room: a quarter of the context
        room = reply_room(params, max_context)
        assert room == max_context // 4
        conversation = Conversation("Be brief.")
        exchange = "The quick brown fox jumps over the lazy dog. " * (max_context // 40)  # ~1/4 of the context
        for i in range(4):
            conversation.add(f"Part {i}: {exchange}", f"Noted {i}.")
        text = "Summarise."
        before = list(conversation.turns)
        dropped = fit_history(client, conversation, text, params, max_context)
        assert dropped >= 1 and conversation.turns == before[2 * dropped:]  # the oldest first
        assert len(client.tokenize(messages=conversation.messages(text))) + room <= max_context
        conversation.turns[:0] = before[2 * dropped - 2:2 * dropped]  # one exchange fewer dropped: too long
        assert len(client.tokenize(messages=conversation.messages(text))) + room > max_context

        short = Conversation()
        chat_turn(client, short, "Count to twenty.", SamplingParams(max_tokens=3, temperature=0.0), max_context)
    out, err = capsys.readouterr()
    assert out.strip() and "(reply cut at the --max-tokens limit of 3 tokens)" in err
    assert len(short.turns) == 2 and short.turns[1]["content"] == out.rstrip("\n")
    assert "context limit of 2048" in length_note(100, SamplingParams(max_tokens=500), 2048)
