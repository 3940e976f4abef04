"""The greedy token's kernel (graph_executor/kernels/argmax.py) against torch.argmax: random vectors of every size
class, the cases argmax's contract decides (NaN, ties, -0.0, -inf), its state left reset, bad input; on the CPU under the
Triton interpreter, and on a GPU (`cuda`) eagerly, in a CUDA graph and through the Sampler's greedy path."""

from __future__ import annotations

import pytest
import torch

from graph_executor.kernels.argmax import BLOCK, EMPTY, Argmax

# the CPU case runs the kernel under the Triton interpreter, which is on only where there is no GPU (conftest.py)
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter off")),
           pytest.param("cuda", marks=pytest.mark.cuda)]
SIZES = (1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 32000, 49152, 128256)


def _special_cases(n: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(n)
    nan = torch.randn(n, generator=g)
    nan[[n // 3, n // 2, n - 1]] = float("nan")  # the first NaN is the largest value
    tie = torch.randn(n, generator=g)
    tie[[n // 5, n // 2, n - 1]] = 1e4  # the first of equal maxima
    zeros = torch.zeros(n)
    zeros[[0, n // 2]] = -0.0  # -0.0 == +0.0: index 0
    inf = torch.tensor([1.0, float("inf")]).repeat(n // 2)
    inf[-1] = float("nan")  # NaN above +inf
    return [("nan", nan), ("tie", tie), ("zeros", zeros), ("-inf", torch.full((n,), -float("inf"))),
            ("negative", -torch.rand(n, generator=g) - 1.0), ("inf and nan", inf)]


@pytest.mark.parametrize("device", DEVICES)
def test_the_kernel_gives_torch_argmax(device: str) -> None:
    argmax = Argmax(torch.device(device))
    out = torch.full((1,), -1, dtype=torch.int64, device=device)
    g = torch.Generator().manual_seed(0)
    cases = [(f"randn {n}", torch.randn(n, generator=g) * 10) for n in SIZES]
    cases += [(f"{name} {n}", x) for n in (9000, 40000) for name, x in _special_cases(n)]
    for name, x in cases:
        x = x.to(device)
        out.fill_(-1)
        assert int(argmax(x, out)) == int(torch.argmax(x.cpu())), name
        assert int(argmax.cell) == EMPTY and int(argmax.count) == 0, name  # reset for the next call


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_one_line(device: str) -> None:
    argmax = Argmax(torch.device(device))
    out = torch.zeros(1, dtype=torch.int64, device=device)
    for x in (torch.zeros(4, dtype=torch.float16, device=device), torch.zeros(2, 3, device=device),
              torch.zeros(0, device=device), torch.zeros(8, device=device)[::2]):
        with pytest.raises(ValueError, match="x: expected a non-empty contiguous"):
            argmax(x, out)
    with pytest.raises(ValueError, match=r"out: expected a \[1\] int64"):
        argmax(torch.zeros(4, device=device), torch.zeros(2, dtype=torch.int64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_the_token_is_filed_in_the_ring_at_the_position_read_on_the_device(device: str) -> None:
    """The executor's form (graph_executor/greedy_token.py): ring[position % R] gets the index too, the position
    read from device memory; every other slot is left as it was; a ring without its position is refused."""
    argmax = Argmax(torch.device(device))
    out = torch.zeros(1, dtype=torch.int64, device=device)
    ring = torch.full((16,), -7, dtype=torch.int64, device=device)
    g = torch.Generator().manual_seed(4)
    for position in (0, 5, 15, 16, 37):
        x = torch.randn(9000, generator=g).to(device)
        before = ring.clone()
        argmax(x, out, ring=ring, position=torch.tensor([position], device=device))
        want = int(torch.argmax(x.cpu()))
        assert int(out) == want and int(ring[position % 16]) == want, position
        others = torch.arange(16, device=device) != position % 16
        assert torch.equal(ring[others], before[others]), position
    with pytest.raises(ValueError, match="ring and position"):
        argmax(torch.zeros(4, device=device), out, ring=ring)
    with pytest.raises(ValueError, match="ring and position"):
        argmax(torch.zeros(4, device=device), out, ring=ring.float(), position=torch.zeros(1, dtype=torch.int64,
                                                                                        device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_advance_moves_the_device_position_on_after_filing(device: str) -> None:
    """`advance` (the executor's decode_argmax graph): each call files at the position it reads, then leaves
    position + 1 there, so consecutive calls fill consecutive slots with no write from the host between them; only
    with a ring and position."""
    argmax = Argmax(torch.device(device))
    out = torch.zeros(1, dtype=torch.int64, device=device)
    ring = torch.full((4,), -7, dtype=torch.int64, device=device)
    position = torch.tensor([14], device=device)
    g = torch.Generator().manual_seed(5)
    for step in range(6):  # 14..19: past the ring's end and round it
        x = torch.randn(5000, generator=g).to(device)
        argmax(x, out, ring=ring, position=position, advance=True)
        assert int(position) == 15 + step and int(ring[(14 + step) % 4]) == int(torch.argmax(x.cpu())), step
    with pytest.raises(ValueError, match="advance"):
        argmax(torch.zeros(4, device=device), out, advance=True)


@pytest.mark.cuda
def test_in_a_cuda_graph_and_through_the_sampler() -> None:
    from bench.probes.verify_plan import graphed
    from jit_context.sampler import Sampler
    from jit_context.sampling_params import SamplingParams

    x = torch.randn(32000, device="cuda")
    out = torch.zeros(1, dtype=torch.int64, device="cuda")
    argmax = Argmax(x.device)
    graph = graphed(lambda: argmax(x, out))
    for seed in range(3):  # every replay reads the vector's new values
        x.copy_(torch.randn(32000, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        assert int(out) == int(torch.argmax(x)), seed
    sampler = Sampler(32000, torch.device("cuda"))
    assert sampler._argmax is not None  # the greedy hot path takes the kernel on a GPU
    sampler.start_request(SamplingParams(temperature=0.0), [1, 2])
    for seed in range(3):
        logits = torch.randn(32000, generator=torch.Generator().manual_seed(10 + seed)).cuda()
        assert int(sampler.sample(logits, out=out)) == int(torch.argmax(logits)), seed


@pytest.mark.parametrize("device", DEVICES)
def test_the_kernel_writes_the_host_copy_too(device: str) -> None:
    """`host`: the index lands in pinned host memory as well (the token read-back without a copy); a host tensor
    that is not [1] int64 in (pinned) host memory is a one-line error."""
    argmax = Argmax(torch.device(device))
    out = torch.full((1,), -1, dtype=torch.int64, device=device)
    host = torch.full((1,), -1, dtype=torch.int64, pin_memory=device == "cuda")
    for seed, n in enumerate((7, 32000, 49152)):
        x = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 10).to(device)
        argmax(x, out, host)
        if device == "cuda":
            torch.cuda.synchronize()
        assert int(host) == int(out) == int(torch.argmax(x.cpu())), n
    for bad in (torch.zeros(2, dtype=torch.int64), torch.zeros(1, dtype=torch.int32),
                torch.zeros(1, dtype=torch.int64, device=device) if device == "cuda" else torch.zeros(1, 1)):
        with pytest.raises(ValueError, match=r"host: expected a \[1\] int64 tensor in pinned host memory"):
            argmax(torch.zeros(4, device=device), out, bad)
    if device == "cuda":
        with pytest.raises(ValueError, match="host: expected"):  # pageable host memory
            argmax(torch.zeros(4, device=device), out, torch.zeros(1, dtype=torch.int64))


@pytest.mark.cuda
def test_the_decode_loop_reads_the_token_the_sampling_wrote() -> None:
    """Generator's form: Sampler.sample(host=TokenReader.next_host()) then push(written=True); greedy (the kernel
    writes the slot) and sampled (a copy does) alike, the host reads each step's token, ring slots reused."""
    from jit_context.sampler import Sampler
    from jit_context.sampling_params import SamplingParams
    from jit_context.token_reader import TokenReader

    sampler = Sampler(32000, torch.device("cuda"))
    reader = TokenReader(torch.device("cuda"))
    out = torch.zeros(1, dtype=torch.int64, device="cuda")
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=1, seed=0)):
        sampler.start_request(params, [1, 2])
        for step in range(6):  # more than the reader's ring of slots
            logits = torch.randn(32000, generator=torch.Generator().manual_seed(step)).cuda()
            reader.push(sampler.sample(logits, out=out, host=reader.next_host()), written=True)
            assert reader.pop() == int(torch.argmax(logits)), (params, step)  # top_k 1: the argmax too
