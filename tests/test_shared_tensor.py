"""Shared tensors: shared memory on CPU (always tested, with a real second process), CUDA IPC on GPU."""

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ipc import messages as m
from ipc.codec import decode, encode
from ipc.errors import ProtocolError, SharedTensorError
from ipc.shared_tensor import (
    TORCH_DTYPES,
    CudaIpcTensor,
    ShmTensor,
    dtype_name,
    import_tensor,
    segment_dir,
    torch_dtype,
)

REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 60


UNUSED = m.TensorSpec("unused", "int64", (1,), "shm", "unused")


def ready_with(**buffers) -> m.Ready:
    """A Ready frame carrying these shared tensors' specs as step buffers (the rest unused), as the executor
    sends it to a second process."""
    specs = {name: UNUSED for name in ("input_ids", "next_token", "logits", "batch_logits", "verify_logits",
                                      "token_ring")}
    specs.update({name: shared.spec for name, shared in buffers.items()})
    return m.Ready(m.PROTOCOL_VERSION, "test", 8, 16, "float32", "cpu", m.StepBufferSpecs(**specs), [0])


def our_segments() -> set[str]:
    return {p.name for p in segment_dir().glob(f"hybridrt-{os.getpid()}-*")}


@pytest.fixture(autouse=True)
def no_leaked_segments():
    before = our_segments()
    # What exists now is not this test's: frozen, it is skipped by the collections here (in a full run the heap
    # holds models and tokenizers, and a full collection per test cost seconds in all).
    gc.freeze()
    try:
        yield
        gc.collect()
    finally:
        gc.unfreeze()
    assert our_segments() == before


def spawn(script: str, *args: str) -> subprocess.Popen:
    """A real second interpreter, importing this repo's `ipc` the way a sibling process would."""
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


# -- CPU: shared memory -----------------------------------------------------------------------------------

CPU_CHILD = r"""
import sys
from ipc.codec import decode
from ipc.shared_tensor import import_tensor
with open(sys.argv[1], "rb") as f:
    ready = decode(f.read())
ids, logits = import_tensor(ready.buffers.input_ids), import_tensor(ready.buffers.logits)
print(ids.tensor.tolist(), flush=True)          # the parent's first write, seen here
sys.stdin.readline()                            # the parent writes again while we both run
print(logits.tensor.float().sum().item(), flush=True)
logits.tensor.fill_(-2.5)                       # our writes, for the parent to see
ids.tensor.mul_(10)
ids.close()
print("done", flush=True)                       # exit without closing `logits`: must not matter
"""


def test_second_process_sees_and_makes_writes(tmp_path):
    ids = ShmTensor.create("input_ids", (4,), "int64")
    logits = ShmTensor.create("logits", (2, 3), torch.bfloat16)
    ids.tensor.copy_(torch.arange(4))
    ready_file = tmp_path / "ready.msgpack"
    ready_file.write_bytes(encode(ready_with(input_ids=ids, logits=logits)))
    child = spawn(CPU_CHILD, str(ready_file))
    try:
        assert child.stdout.readline() == "[0, 1, 2, 3]\n"
        logits.tensor.fill_(1.5)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert float(child.stdout.readline()) == 9.0
        assert child.stdout.readline() == "done\n"
        _, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    finally:
        child.kill()
    assert child.returncode == 0, err
    assert "resource_tracker" not in err and "leaked" not in err, err
    assert ids.tensor.tolist() == [0, 10, 20, 30]
    assert torch.equal(logits.tensor, torch.full((2, 3), -2.5, dtype=torch.bfloat16))
    assert {ids.spec.handle, logits.spec.handle} <= our_segments()  # the importer's exit removed nothing
    ids.close()
    logits.close()
    assert not {ids.spec.handle, logits.spec.handle} & our_segments()


def test_importer_never_unlinks():
    with ShmTensor.create("x", (8,), "float32") as owner:
        reader = import_tensor(owner.spec)
        assert isinstance(reader, ShmTensor) and not reader.is_owner
        with pytest.raises(ValueError):
            reader.unlink()
        reader.close()
        del reader
        gc.collect()
        assert owner.spec.handle in our_segments()


def test_views_outlive_close_and_unlink():
    owner = ShmTensor.create("x", (2, 2), "int32")
    reader = import_tensor(owner.spec)
    view = reader.tensor
    owner.tensor.fill_(7)
    owner.close()
    reader.close()
    assert owner.spec.handle not in our_segments()
    assert view.tolist() == [[7, 7], [7, 7]]  # memory stays mapped while a view lives
    with pytest.raises(ValueError):
        _ = owner.tensor


def test_collected_owner_unlinks():
    owner = ShmTensor.create("x", (4,), "uint8")
    handle = owner.spec.handle
    del owner
    gc.collect()
    assert handle not in our_segments()


@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
def test_every_dtype_shares(dtype):
    with ShmTensor.create("t", (3, 5), dtype) as owner:
        reader = import_tensor(owner.spec)
        assert reader.tensor.dtype == torch_dtype(dtype) and reader.tensor.shape == (3, 5)
        reader.tensor[1, 2] = 1
        assert owner.tensor[1, 2].item() == 1 and owner.tensor.sum().item() == 1
        assert dtype_name(torch_dtype(dtype)) == dtype


def test_scalar_and_offset_views():
    with ShmTensor.create("t", (8,), "int64") as owner:
        owner.tensor.copy_(torch.arange(8))
        tail = m.TensorSpec("tail", "int64", (2, 2), "shm", owner.spec.handle, offset_bytes=4 * 8)
        assert import_tensor(tail).tensor.tolist() == [[4, 5], [6, 7]]
        one = m.TensorSpec("one", "int64", (), "shm", owner.spec.handle, offset_bytes=8)
        assert import_tensor(one).tensor.item() == 1


def test_unknown_dtypes_raise_value_error():
    with pytest.raises(ValueError):
        torch_dtype("float8")
    with pytest.raises(ValueError):
        ShmTensor.create("t", (2,), "float8")
    with pytest.raises(ValueError):
        dtype_name(torch.complex64)


@pytest.mark.parametrize(
    "change, error",
    [
        ({"handle": "hybridrt-0-missing-00000000"}, SharedTensorError),
        ({"shape": (1000,)}, SharedTensorError),  # more than the segment holds
        ({"offset_bytes": 2}, ValueError),  # not element-aligned
        ({"handle": ".."}, ValueError),
        ({"shape": (0, 4)}, ValueError),
        ({"dtype": "float8"}, ValueError),
    ],
)
def test_bad_specs_fail_cleanly(change, error):
    with ShmTensor.create("t", (4,), "float32") as owner:
        fields = {
            **{k: getattr(owner.spec, k) for k in ("name", "dtype", "shape", "kind", "handle")},
            **change,
        }
        with pytest.raises(error):
            import_tensor(m.TensorSpec(**fields))


def test_bad_name_hint():
    with pytest.raises(ValueError):
        ShmTensor.create("../escape", (2,), "float32")


def test_spec_survives_the_wire():
    with ShmTensor.create("t", (2, 3), "float16") as owner:
        spec = decode(encode(ready_with(logits=owner))).buffers.logits
        assert spec == owner.spec
        assert import_tensor(spec).tensor.shape == (2, 3)


# -- GPU: CUDA IPC ----------------------------------------------------------------------------------------

CUDA_CHILD = r"""
import sys, torch
from ipc.codec import decode
from ipc.shared_tensor import import_tensor
ready = decode(sys.stdin.buffer.read())
logits = import_tensor(ready.buffers.logits)
print(logits.tensor.sum().item(), logits.tensor.device.type, tuple(logits.tensor.shape), flush=True)
logits.tensor.mul_(2).add_(1)
torch.cuda.synchronize()
print("done", flush=True)
"""

# A CUDA process that never imports torch (so nothing of torch.multiprocessing): cupy and our wire format alone.
CUPY_CHILD = r"""
import sys
import cupy
from ipc import cuda_ipc
from ipc.codec import decode
spec = decode(sys.stdin.buffer.read()).buffers.logits
buffer = cuda_ipc.open_handle(spec.handle, spec.extra["buffer_bytes"], spec.device)
values = buffer.as_cupy().view(cupy.float32)
print(float(values.sum()), flush=True)
values *= 3
cupy.cuda.runtime.deviceSynchronize()
assert "torch" not in sys.modules
print("done", flush=True)
"""


def run_child(script: str, shared) -> list[str]:
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO, input=encode(ready_with(logits=shared)),
                           capture_output=True, timeout=CHILD_TIMEOUT_S, check=False)
    assert child.returncode == 0, child.stderr.decode()
    return child.stdout.decode().split("\n")[:2]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ipc_second_process_sees_and_makes_writes():
    shared = CudaIpcTensor.create("logits", (4, 8), "float32")
    assert shared.spec.kind == "cuda_ipc" and shared.tensor.is_cuda and torch.count_nonzero(shared.tensor) == 0
    shared.tensor.copy_(torch.arange(32, dtype=torch.float32, device="cuda").view(4, 8))
    torch.cuda.synchronize()
    assert run_child(CUDA_CHILD, shared) == [f"{float(sum(range(32)))} cuda (4, 8)", "done"]
    expected = torch.arange(32, dtype=torch.float32, device="cuda").view(4, 8) * 2 + 1
    assert torch.equal(shared.tensor, expected)
    shared.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ipc_opens_in_a_process_without_torch():
    shared = CudaIpcTensor.create("logits", (16,), torch.float32)
    shared.tensor.fill_(2.0)
    torch.cuda.synchronize()
    assert run_child(CUPY_CHILD, shared) == ["32.0", "done"]
    assert torch.equal(shared.tensor, torch.full((16,), 6.0, device="cuda"))
    shared.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ipc_buffer_is_freed_after_its_last_view():
    """The importer exits without closing; once the exporter's last view is gone the memory is free again."""
    import cupy

    torch.cuda.synchronize()
    before = cupy.cuda.runtime.memGetInfo()[0]
    shared = CudaIpcTensor.create("logits", (64, 1024, 1024), "float32")  # 256 MiB
    assert cupy.cuda.runtime.memGetInfo()[0] < before - (200 << 20)
    view = shared.tensor[0]
    assert run_child(CUDA_CHILD, shared)[1] == "done"
    shared.close()
    gc.collect()
    assert cupy.cuda.runtime.memGetInfo()[0] < before - (200 << 20)  # `view` still holds the buffer
    del view
    gc.collect()
    assert abs(cupy.cuda.runtime.memGetInfo()[0] - before) < (32 << 20)


# -- the step buffers: one layout, exported by the executor, opened by the JIT context ---------------------


def test_step_buffers_export_and_open_share_memory():
    from ipc.step_buffers import SharedStepBuffers, buffer_layout

    exported = SharedStepBuffers.export(vocab_size=10, max_context=32, device=torch.device("cpu"))
    try:
        specs = decode(encode(m.Ready(m.PROTOCOL_VERSION, "t", 10, 32, "float32", "cpu", exported.specs(), [0])))
        opened = SharedStepBuffers.open(specs.buffers, vocab_size=10, max_context=32)
        for name, (shape, dtype) in buffer_layout(10, 32).items():
            mine, theirs = getattr(exported.buffers, name), getattr(opened.buffers, name)
            assert mine.shape == theirs.shape == shape and mine.dtype == theirs.dtype == dtype
            assert torch.count_nonzero(theirs) == 0  # zeroed at export
        opened.buffers.input_ids[:3].copy_(torch.tensor([7, 8, 9]))
        exported.buffers.logits.fill_(0.5)
        assert exported.buffers.input_ids[:3].tolist() == [7, 8, 9]
        assert opened.buffers.logits.sum().item() == 5.0
        opened.close()
        # A JIT context that expects another model's vocabulary refuses the buffers instead of misreading them.
        with pytest.raises(ProtocolError, match="logits"):
            SharedStepBuffers.open(specs.buffers, vocab_size=11, max_context=32)
    finally:
        exported.close()
