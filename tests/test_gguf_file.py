"""sgl_jax/models/gguf_file.py against gguf-py's GGUFReader (the independent reference): the same metadata
values and the same tensor names, shapes, types and payload bytes; bad files give a clear error."""

import os

import gguf
import numpy as np
import pytest

from sgl_jax.models.gguf_file import GGUFFile
from sgl_jax.models.hub import resolve_model
from sgl_jax.models.loader import ModelLoadError, read_gguf
from sgl_jax.models.testing import write_tiny_gguf


def same_as_gguf_py(path):
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}  # its header pseudo-fields
    assert set(ours.fields) == set(ref_fields)
    for k, f in ref_fields.items():
        a, b = ours.fields[k], f.contents()
        a = a.tolist() if isinstance(a, np.ndarray) else a
        assert a == pytest.approx(b) if isinstance(b, float) else a == b, k
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for x, y in zip(ours.tensors, ref.tensors):
        assert x.shape == tuple(int(v) for v in y.shape) and x.tensor_type == int(y.tensor_type), x.name
        assert np.array_equal(x.data, np.asarray(y.data).reshape(-1).view(np.uint8)), x.name
    return ours


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family,quant", [("llama", "F32"), ("qwen2", "F16"), ("llama3-tied-mqa", "Q8_0")])
def test_tiny_files_read_as_gguf_py_reads_them(tmp_path, family, quant):
    same_as_gguf_py(write_tiny_gguf(family, str(tmp_path / "m.gguf"), quant=quant))


@pytest.mark.timeout(120)
def test_smollm2_reads_as_gguf_py_reads_it():
    f = same_as_gguf_py(resolve_model("smollm2-135m"))  # Q4_1 blocks, a 49k-token BPE vocabulary and merges
    assert len(f.fields["tokenizer.ggml.tokens"]) == 49152


@pytest.mark.timeout(60)
def test_bad_files_are_a_clear_error_naming_the_file(tmp_path):
    good = write_tiny_gguf("llama", str(tmp_path / "m.gguf"))
    blob = open(good, "rb").read()
    cases = {"empty": b"", "not_gguf": b"PK\x03\x04" + blob[4:], "header_cut": blob[:200],
             "data_cut": blob[:-1000], "version": blob[:4] + (9).to_bytes(4, "little") + blob[8:]}
    for name, data in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(data)
        with pytest.raises(ModelLoadError, match=f"{p}: not a valid GGUF file or truncated"):
            read_gguf(str(p))
    with pytest.raises(ModelLoadError, match="no such file"):
        read_gguf(str(tmp_path / "missing.gguf"))
    assert os.path.exists(good) and read_gguf(good)[1]["general.architecture"] == "llama"
