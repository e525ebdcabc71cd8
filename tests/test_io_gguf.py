"""The fast GGUF header walker (layerzo.io.gguf) and the check model loading runs with it."""

from __future__ import annotations

import time

import pytest

from layerzo.errors import ModelLoadError
from layerzo.io.gguf import read_gguf_header, tensor_nbytes
from layerzo.model.loading import check_gguf_file, demo_model_path


def test_the_demo_header_is_read_fast_and_agrees_with_the_gguf_package():
    import gguf

    path = demo_model_path()
    start = time.perf_counter()
    header = read_gguf_header(path)
    seconds = time.perf_counter() - start
    reader = gguf.GGUFReader(str(path))
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    assert all(tensor_nbytes(t.dims, t.ggml_type) == int(r.n_bytes) for t, r in zip(header.tensors, reader.tensors))
    assert header.architecture == "llama" and header.values["llama.block_count"] == 30
    assert seconds < 1.0  # GGUFReader needs seconds for the 49k-token vocabulary; the walk, milliseconds
    check_gguf_file(path)  # the real file passes the loading check


def test_a_truncated_gguf_and_a_wrong_block_count_are_refused(tmp_path):
    import gguf

    data = demo_model_path().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        read_gguf_header(cut)
    writer = gguf.GGUFWriter(str(tmp_path / "w.gguf"), "llama")
    writer.add_block_count(2**31)  # a mutated count made transformers loop for minutes (found by fuzzing)
    import numpy as np

    writer.add_tensor("blk.0.attn_norm.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="declares 2147483648 decoder blocks"):
        check_gguf_file(tmp_path / "w.gguf")
