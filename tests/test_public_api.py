"""The public import (`hybridrt`) and the README's native-client example, run as written against a real server
(the shared one): it prints the reply once, then its finish line."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_public_import_names_the_client_api() -> None:
    import hybridrt
    from launch.async_client import AsyncClient
    from launch.client import Client

    assert hybridrt.Client is Client and hybridrt.AsyncClient is AsyncClient
    assert set(hybridrt.__all__) == {"AsyncClient", "ChatOptions", "Client", "Finished", "SamplingParams",
                                     "ServerError", "StructuredOutput", "TokenChunk"}


def test_the_readme_native_client_example_prints_the_reply_once(shared_server, capsys) -> None:
    text = README.read_text()
    start = text.index("Native client (ZeroMQ + msgpack")
    code = re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)
    assert code.startswith("from hybridrt import")
    exec(code.replace("tcp://127.0.0.1:7461", shared_server.address), {})  # noqa: S102 - the README's own code
    out = capsys.readouterr().out
    reply, _, tail = out.rpartition("\n[")
    assert re.fullmatch(r"(stop|length), \d+ tokens\]\n", tail), out
    assert reply.strip() and out.count(reply.strip()) == 1  # not printed a second time from `Finished`
