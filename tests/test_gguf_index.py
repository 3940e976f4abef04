"""GGUFIndex reads what gguf's own reader reads: every field's contents and every tensor's name, type, shape, offset
and bytes, on a file with every value type and several tensor types, and on the default model's file."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from graph_executor.loading import default_model
from graph_executor.loading.gguf_index import GGUFIndex, UnsupportedLayout
from graph_executor.loading.gguf_loader import open_gguf, reader_class
from ipc.errors import ModelLoadError
from tests.test_quant import gguf_weights


def same_as_gguf_reader(path) -> GGUFIndex:
    ours, theirs = GGUFIndex(path), reader_class()(str(path))
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}  # the reader's own header keys
    assert list(ours.fields) == list(fields)
    for key, field in fields.items():
        assert ours.fields[key].contents() == field.contents(), key
    assert ours.data_offset == theirs.data_offset
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, a.n_elements, a.n_bytes, a.data_offset) == \
               (b.name, b.tensor_type, b.n_elements, b.n_bytes, b.data_offset)
        assert a.shape.tolist() == b.shape.tolist()
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data), a.name
        assert not a.data.flags.writeable  # a view of the file, as gguf's
    return ours


def write(path, endianess=gguf.GGUFEndian.LITTLE, alignment: int | None = None) -> None:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch="llama", endianess=endianess)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    V = gguf.GGUFValueType
    for i, (vtype, value) in enumerate([(V.UINT8, 200), (V.INT8, -5), (V.UINT16, 60000), (V.INT16, -300),
                                        (V.UINT32, 4_000_000_000), (V.INT32, -7), (V.FLOAT32, 0.25),
                                        (V.BOOL, True), (V.STRING, "héllo"), (V.UINT64, 2**63 + 5),
                                        (V.INT64, -(2**40)), (V.FLOAT64, 1e-300)]):
        w.add_key_value(f"test.scalar{i}", value, vtype)
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.5, 1.5])
    w.add_array("test.bools", [True, False, True])
    w.add_array("test.strings", ["a", "", "ünïcode", "x" * 300])
    w.add_array("test.empty", [])
    w.add_token_list([f"tok{i}" for i in range(1000)])
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 8)).astype(np.float16))
    w.add_tensor("i32", np.arange(6, dtype=np.int32))
    for i, qtype in enumerate((T.Q8_0, T.Q4_0, T.Q4_1, T.Q6_K)):
        w.add_tensor(f"q_{qtype.name}", gguf_weights(qtype, 2, 256, seed=i), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_every_value_type_and_tensor_type(tmp_path) -> None:
    write(tmp_path / "m.gguf")
    index = same_as_gguf_reader(tmp_path / "m.gguf")
    assert index.fields["test.strings"].contents() == ["a", "", "ünïcode", "x" * 300]
    assert index.fields["test.scalar9"].contents() == 2**63 + 5
    assert len(index.fields["tokenizer.ggml.tokens"].contents()) == 1000


def test_custom_alignment(tmp_path) -> None:
    write(tmp_path / "m.gguf", alignment=256)
    assert same_as_gguf_reader(tmp_path / "m.gguf").data_offset % 256 == 0


def test_the_default_models_file() -> None:
    try:
        path = default_model.gguf_path()
    except ModelLoadError:
        pytest.skip("the default model is not installed")
    index = same_as_gguf_reader(path)
    assert len(index.fields["tokenizer.ggml.tokens"].contents()) == 49152


def test_big_endian_files_go_to_ggufs_reader(tmp_path) -> None:
    write(tmp_path / "be.gguf", endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(UnsupportedLayout):
        GGUFIndex(tmp_path / "be.gguf")
    reader = open_gguf(tmp_path / "be.gguf")
    assert not isinstance(reader, GGUFIndex)
    assert reader.fields["test.strings"].contents() == ["a", "", "ünïcode", "x" * 300]


def test_bad_files_are_one_line_errors(tmp_path) -> None:
    write(tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    cases = {"magic": b"GGUX" + data[4:], "version": data[:4] + (7).to_bytes(4, "little") + data[8:],
             "header cut": data[:3000], "tensor cut": data[:-100], "empty": b""}
    for name, content in cases.items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(content)
        with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
            open_gguf(bad)
