"""hybridrt's public Python API: the native clients of a running `hybridrt serve` (blocking and asyncio), their
messages and errors, the sampling parameters (structured output among them) and the chat template options. The
process packages (`graph_executor`, `jit_context`, `ipc`, `launch`, `bench`) are the runtime's internals, named by
the project's design card.

    from hybridrt import Client
    with Client("tcp://127.0.0.1:7461") as client:
        for msg in client.generate("Hi", params={"max_tokens": 32}):
            ...
"""

from ipc.messages import ChatOptions, Finished, TokenChunk
from jit_context.sampling_params import SamplingParams
from jit_context.structured_output import StructuredOutput
from launch.async_client import AsyncClient
from launch.client import Client, ServerError

__all__ = ["AsyncClient", "ChatOptions", "Client", "Finished", "SamplingParams", "ServerError", "StructuredOutput",
           "TokenChunk"]
