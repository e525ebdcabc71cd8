"""GGUF out (``layerzo apply BASE.gguf PATCH -o OUT.gguf``): byte-identical copy except the patched layer,
llama.cpp's layout, refusals that write nothing, and the real clients (llama.cpp, transformers) on the demo.

The fast tests build tiny GGUFs with the ``gguf`` package's own ``GGUFWriter`` and check OUT with its own
``GGUFReader``, with the Q/K row permutation taken from the references (llama.cpp's converter formula,
transformers' ``LlamaTensorProcessor``), so none of them trusts the code under test for the layout.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from layerzo import __version__
from layerzo.cli.main import app
from layerzo.core.hashing import tensor_sha256
from layerzo.errors import ArchitectureError, BaseMismatchError, ConfigError, ModelLoadError, OutputExistsError
from layerzo.patch.apply import apply_patch
from layerzo.patch.format import LayerPatch
from layerzo.io.gguf import read_gguf_header
from layerzo.patch.gguf import (MARKER_KEY, apply_patch_gguf, llama_permute, llama_unpermute, patch_fingerprint,
                                resolve_gguf_type)
from layerzo.patch.manifest import FORMAT_VERSION, PatchManifest
from patch_helpers import make_patch

import gguf  # noqa: E402  (a dependency of layerzo)
Q = gguf.GGMLQuantizationType

HIDDEN, HEADS, KV_HEADS, INTER, VOCAB = 64, 4, 2, 128, 40
LAYER_PARTS = {  # HF name inside a layer -> (GGUF name, HF shape)
    "self_attn.q_proj.weight": ("attn_q.weight", (HIDDEN, HIDDEN)),
    "self_attn.k_proj.weight": ("attn_k.weight", (HIDDEN // HEADS * KV_HEADS, HIDDEN)),
    "self_attn.v_proj.weight": ("attn_v.weight", (HIDDEN // HEADS * KV_HEADS, HIDDEN)),
    "self_attn.o_proj.weight": ("attn_output.weight", (HIDDEN, HIDDEN)),
    "mlp.gate_proj.weight": ("ffn_gate.weight", (INTER, HIDDEN)),
    "mlp.up_proj.weight": ("ffn_up.weight", (INTER, HIDDEN)),
    "mlp.down_proj.weight": ("ffn_down.weight", (HIDDEN, INTER)),
    "input_layernorm.weight": ("attn_norm.weight", (HIDDEN,)),
    "post_attention_layernorm.weight": ("ffn_norm.weight", (HIDDEN,)),
}


# ---------------------------------------------------------------------------- references + tiny files
def reference_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def reference_unpermute(w: np.ndarray, gguf_name: str) -> np.ndarray:
    """transformers' GGUF loader (LlamaTensorProcessor) on a dequantized GGUF tensor."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    return processor.process(weights=w, name=gguf_name).weights


def heads_of(gguf_name: str) -> int | None:
    return HEADS if ".attn_q." in gguf_name else KV_HEADS if ".attn_k." in gguf_name else None


def write_tiny_gguf(path: Path, *, arch: str = "llama", layers: int = 2, qtype=Q.Q8_0, alignment: int | None = None,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny GGUF written by GGUFWriter; returns the HF-layout float32 values a GGUF loader reads back."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(7)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(VOCAB)])
    writer.add_token_types([1] * VOCAB)
    writer.add_bool("tiny.flag", True)
    writer.add_float64("tiny.f64", 1.0 / 3.0)
    if alignment:
        writer.add_custom_alignment(alignment)
    hf: dict[str, torch.Tensor] = {}
    entries = [("token_embd.weight", "model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        entries += [(f"blk.{i}.{g}", f"model.layers.{i}.{k}", shape) for k, (g, shape) in LAYER_PARTS.items()]
    entries.append(("output_norm.weight", "model.norm.weight", (HIDDEN,)))
    for gguf_name, hf_name, shape in entries:
        value = rng.standard_normal(shape).astype(np.float32) * 0.1
        if heads_of(gguf_name):
            value = reference_permute(value, HEADS, heads_of(gguf_name))
        if len(shape) == 1 or gguf_name.endswith("_norm.weight"):
            writer.add_tensor(gguf_name, value)
            stored = value
        else:
            data = gguf.quants.quantize(value, qtype)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
            stored = gguf.quants.dequantize(data, qtype)
        hf[hf_name] = torch.from_numpy(np.ascontiguousarray(reference_unpermute(stored, gguf_name)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def tiny_patch(base_hf: dict[str, torch.Tensor], layer: int = 1, *, layers: int = 2, scale: float = 0.05,
               kind: str = "layers", dtype: str = "float32") -> LayerPatch:
    gen = torch.Generator().manual_seed(layer)
    keys = [f"model.layers.{layer}.{k}" for k in LAYER_PARTS]
    if kind == "layers":
        tensors = {k: (base_hf[k] + scale * torch.randn(base_hf[k].shape, generator=gen)).to(getattr(torch, dtype))
                   for k in keys}
        fingerprint = {k: tensor_sha256(base_hf[k].to(getattr(torch, dtype))) for k in keys}
        lora = None
    else:
        tensors, fingerprint, lora = {}, {}, {"r": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"]}
        for proj in ("q_proj", "v_proj"):
            stem = f"model.layers.{layer}.self_attn.{proj}"
            rows = base_hf[stem + ".weight"].shape[0]
            tensors[stem + ".lora_A.weight"] = torch.randn((2, HIDDEN), generator=gen)
            tensors[stem + ".lora_B.weight"] = torch.randn((rows, 2), generator=gen)
            fingerprint[stem + ".weight"] = tensor_sha256(base_hf[stem + ".weight"])
    manifest = PatchManifest(
        format_version=FORMAT_VERSION, layerzo_version=__version__, base_model="tiny/llama-gguf", base_revision=None,
        architecture="LlamaForCausalLM", num_layers=layers, layers=(layer,), kind=kind, dtype=dtype,
        base_fingerprint=fingerprint, recipe={"task": "sst2", "dtype": dtype}, profile=None, metrics={}, lora=lora)
    return LayerPatch(manifest, tensors)


@pytest.fixture()
def tiny(tmp_path):
    base = tmp_path / "base.gguf"
    hf = write_tiny_gguf(base)
    patch_dir = tiny_patch(hf).save_pretrained(tmp_path / "patch")
    return base, hf, patch_dir


def run_apply(*args):
    return CliRunner().invoke(app, ["apply", *map(str, args)])


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fields_of(reader) -> dict:
    return {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def same_field(a, b) -> bool:
    return a.types == b.types and len(a.parts) == len(b.parts) and all(
        x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a.parts, b.parts))


def assert_identical_except(base: Path, out: Path, patched: set[str]) -> tuple[dict, dict]:
    """Every original metadata key/value and every non-patched tensor of BASE is byte-identical in OUT."""
    a, b = gguf.GGUFReader(base), gguf.GGUFReader(out)
    fa, fb = fields_of(a), fields_of(b)
    assert list(fb)[:len(fa)] == list(fa)  # the original keys, in their order, then layerzo's
    assert all(same_field(fa[k], fb[k]) for k in fa)
    assert all(k.startswith("layerzo.") for k in list(fb)[len(fa):])
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for name, t in ta.items():
        if name not in patched:
            assert tb[name].tensor_type == t.tensor_type and tb[name].data.tobytes() == t.data.tobytes(), name
    return fb, tb


# ---------------------------------------------------------------------------- layout
def test_permutation_is_llama_cpps_and_transformers_undoes_it():
    w = np.arange(HIDDEN // HEADS * KV_HEADS * 6, dtype=np.float32).reshape(-1, 6)
    assert np.array_equal(llama_permute(w, HEADS, KV_HEADS), reference_permute(w, HEADS, KV_HEADS))
    assert np.array_equal(llama_unpermute(llama_permute(w, HEADS, KV_HEADS), HEADS, KV_HEADS), w)
    assert np.array_equal(llama_unpermute(w, HEADS, KV_HEADS), reference_unpermute(w, "blk.0.attn_k.weight"))
    q = np.random.default_rng(0).standard_normal((HIDDEN, 8)).astype(np.float32)
    assert np.array_equal(reference_unpermute(llama_permute(q, HEADS, HEADS), "blk.0.attn_q.weight"), q)
    assert not np.array_equal(llama_permute(q, HEADS, HEADS), q)


def test_header_reader_agrees_with_gguf_reader(tmp_path):
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, alignment=64)
    header, reader = read_gguf_header(path), gguf.GGUFReader(path)
    assert header.alignment == 64 and header.data_offset == reader.data_offset
    assert [(t.name, t.dims, t.ggml_type, header.data_offset + t.offset, t.n_bytes) for t in header.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), t.data_offset, t.n_bytes) for t in reader.tensors]
    assert header.values["llama.attention.head_count_kv"] == KV_HEADS and header.values["tiny.flag"] is True
    assert header.values["tokenizer.ggml.tokens"] is None  # vocabularies are skipped, not decoded
    assert list(header.values) == list(fields_of(reader))


# ---------------------------------------------------------------------------- round trips on tiny files
@pytest.mark.parametrize("gguf_type", ["F16", "F32", "Q8_0", "q8_0"])
def test_tiny_round_trip_is_byte_identical_except_the_layer(tmp_path, gguf_type):
    base = tmp_path / "base.gguf"
    hf = write_tiny_gguf(base, alignment=64)
    patch = tiny_patch(hf)
    before = sha256_of(base)
    report = apply_patch(base, patch, tmp_path / "out.gguf", gguf_type=gguf_type)
    assert sha256_of(base) == before  # the base is never written
    patched = {f"blk.1.{g}" for g, _ in LAYER_PARTS.values()}
    fields, tensors = assert_identical_except(base, tmp_path / "out.gguf", patched)
    assert fields["general.alignment"].contents() == 64
    assert fields["layerzo.base_sha256"].contents() == before == report.base_sha256
    assert fields[MARKER_KEY].contents() == patch_fingerprint(patch) == report.patch_fingerprint
    assert fields["layerzo.layers"].contents() == [1] and fields["layerzo.tensor_type"].contents() == gguf_type.upper()
    for key, (part, _) in LAYER_PARTS.items():
        name, value = f"blk.1.{part}", patch.tensors[f"model.layers.1.{key}"].numpy()
        laid_out = reference_permute(value, HEADS, heads_of(name)) if heads_of(name) else value
        want = Q.F32 if value.ndim == 1 else Q[gguf_type.upper()]
        expected = gguf.quants.quantize(laid_out, want)
        assert tensors[name].tensor_type == want and tensors[name].data.tobytes() == expected.tobytes(), name
        assert report.tensors_rewritten[name] == want.name
    assert report.tensors_copied == len(tensors) - len(patched)


def test_base_own_type_lora_and_bf16_fingerprints(tmp_path):
    base = tmp_path / "base.gguf"
    hf = write_tiny_gguf(base, qtype=Q.Q4_0)
    report = apply_patch_gguf(base, tiny_patch(hf, dtype="bfloat16"), tmp_path / "own.gguf", gguf_type="Q4_0")
    assert report.gguf_type == "Q4_0" and report.tensors_rewritten["blk.1.attn_q.weight"] == "Q4_0"
    lora = tiny_patch(hf, kind="lora")
    apply_patch_gguf(base, lora, tmp_path / "lora.gguf", gguf_type="F32")
    _, tensors = assert_identical_except(base, tmp_path / "lora.gguf", {"blk.1.attn_q.weight", "blk.1.attn_v.weight"})
    for proj, name in (("q_proj", "blk.1.attn_q.weight"), ("v_proj", "blk.1.attn_v.weight")):
        stem = f"model.layers.1.self_attn.{proj}"
        want = hf[stem + ".weight"] + 2.0 * (lora.tensors[stem + ".lora_B.weight"] @ lora.tensors[stem + ".lora_A.weight"])
        got = reference_unpermute(np.array(tensors[name].data), name)
        assert torch.allclose(torch.from_numpy(np.ascontiguousarray(got)), want, atol=1e-6)


def test_cli_writes_gguf_and_replaces_only_its_own_output(tiny, tmp_path):
    base, _, patch_dir = tiny
    out = tmp_path / "out.gguf"
    result = run_apply(base, patch_dir, "-o", out, "--gguf-type", "Q8_0", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["apply"]["gguf_type"] == "Q8_0"
    assert "rewrote 9 tensor(s) of layer 1 as Q8_0" in " ".join(result.stderr.split())
    first = sha256_of(out)
    assert run_apply(base, patch_dir, "-o", out).exit_code == 1  # exists
    result = run_apply(base, patch_dir, "-o", out, "--overwrite")  # an earlier output of this command: replaced
    assert result.exit_code == 0, result.output
    assert sha256_of(out) != first and gguf.GGUFReader(out).get_field("layerzo.tensor_type").contents() == "F16"


# ---------------------------------------------------------------------------- refusals: one line, nothing written
def _unverified(tmp_path, base, patch_dir):
    gemma = tmp_path / "gemma.gguf"
    write_tiny_gguf(gemma, arch="gemma2")
    return gemma, patch_dir, [], "gemma2"


def _bad_type(tmp_path, base, patch_dir):
    return base, patch_dir, ["--gguf-type", "Q4_K"], "gguf package cannot encode it"


def _foreign_type(tmp_path, base, patch_dir):
    return base, patch_dir, ["--gguf-type", "Q4_1"], "neither F16/F32/Q8_0 nor the base's own type (Q8_0)"


def _unknown_type(tmp_path, base, patch_dir):
    return base, patch_dir, ["--gguf-type", "F8"], "not a GGML tensor type"


def _wrong_base(tmp_path, base, patch_dir):
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, seed=1)
    return other, patch_dir, [], "base tensor blk.1.attn_q.weight (model.layers.1.self_attn.q_proj.weight) differs"


def _layer_count(tmp_path, base, patch_dir):
    deep = tmp_path / "deep.gguf"
    write_tiny_gguf(deep, layers=3)
    return deep, patch_dir, [], "2-layer tiny/llama-gguf but the base has 3 layers"


def _out_exists(tmp_path, base, patch_dir):
    (tmp_path / "out.gguf").write_bytes(b"precious")
    return base, patch_dir, [], "already exists"


def _overwrite_foreign(tmp_path, base, patch_dir):
    (tmp_path / "out.gguf").write_bytes(b"precious")
    return base, patch_dir, ["--overwrite"], "is not an earlier layerzo apply GGUF output"


def _folder_base(tmp_path, base, patch_dir):
    (tmp_path / "ckpt").mkdir()
    return tmp_path / "ckpt", patch_dir, [], "a .gguf output needs a .gguf base"


def _truncated_header(tmp_path, base, patch_dir):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(base.read_bytes()[:200])
    return cut, patch_dir, [], "not a valid GGUF file: its header is truncated or corrupt"


def _truncated_data(tmp_path, base, patch_dir):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(base.read_bytes()[:-100])
    return cut, patch_dir, [], "cut.gguf is truncated: tensor output_norm.weight ends past the end of the file"


@pytest.mark.parametrize("case", [_unverified, _bad_type, _foreign_type, _unknown_type, _wrong_base, _layer_count,
                                  _out_exists, _overwrite_foreign, _folder_base, _truncated_header,
                                  _truncated_data])
def test_refusals_are_one_line_and_write_nothing(tiny, tmp_path, case):
    base, _, patch_dir = tiny
    base, patch_dir, extra, needle = case(tmp_path, base, patch_dir)
    before = {p.name: sha256_of(p) for p in tmp_path.iterdir() if p.is_file()}
    result = run_apply(base, patch_dir, "-o", tmp_path / "out.gguf", *extra)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in " ".join(result.stderr.split()), result.stderr
    assert {p.name: sha256_of(p) for p in tmp_path.iterdir() if p.is_file()} == before  # no OUT, no temp, no lock


def test_library_refusals_name_the_problem(tiny, tmp_path):
    base, hf, patch_dir = tiny
    with pytest.raises(OutputExistsError, match="never writes over what it reads"):
        apply_patch_gguf(base, patch_dir, base)
    with pytest.raises(ConfigError, match="applies only to a .gguf output"):
        apply_patch(base, patch_dir, tmp_path / "folder", gguf_type="F16")
    apply_patch_gguf(base, patch_dir, tmp_path / "once.gguf")
    with pytest.raises(BaseMismatchError, match="already a layerzo-patched GGUF"):
        apply_patch_gguf(tmp_path / "once.gguf", tiny_patch(hf, layer=0), tmp_path / "twice.gguf")
    gemma = tmp_path / "gemma.gguf"
    write_tiny_gguf(gemma, arch="gemma2")
    with pytest.raises(ArchitectureError, match="verified for the llama architecture only; gemma.gguf is gemma2"):
        apply_patch_gguf(gemma, patch_dir, tmp_path / "g.gguf")
    with pytest.raises(ConfigError, match="cannot be written"):
        resolve_gguf_type("IQ2_XXS", read_gguf_header(base).tensors)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        read_gguf_header(patch_dir / "layerzo_patch.json")


def test_force_applies_a_mismatched_base_with_a_note(tiny, tmp_path):
    _, _, patch_dir = tiny
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, seed=1)
    report = apply_patch_gguf(other, patch_dir, tmp_path / "forced.gguf", force=True)
    assert any(n.startswith("--force: base tensor model.layers.1.") for n in report.notes)
    assert (tmp_path / "forced.gguf").is_file()


# ---------------------------------------------------------------------------- the demo, in the real clients
DEMO_SCALE = 0.05  # |Δlogits| ≈ 0.96 |logits| at the prompts' last positions; argmax changes on 2 of 5 prompts
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n <", "Once upon a time, there was a little",
           "Water boils at a temperature of", "The quick brown fox jumps over the lazy"]


@pytest.fixture(scope="module")
def demo_out(demo_model, tmp_path_factory):
    from layerzo.model.loading import DEMO_MODEL_ID, demo_model_path

    patch = make_patch(demo_model.model, 11, scale=DEMO_SCALE, base_model=DEMO_MODEL_ID)
    out = tmp_path_factory.mktemp("gguf-out") / "smollm2-layer11.gguf"
    report = apply_patch(None, patch, out)  # the demo GGUF; OUT ending in .gguf → GGUF out, F16
    return demo_model_path(), patch, out, report


def llama_cpp_model(path: Path):
    """llama.cpp through llama-cpp-python, with extra buffer types (AMX / weight repacking) off: on this
    project's CPU (AMX-capable), the AMX int8 matmul of llama-cpp-python 0.3.36 segfaults
    (gdb: ggml_backend_amx_mul_mat) for any batch of more than one token, base model included."""
    import llama_cpp  # the test extra installs it: a missing client fails, it does not skip
    from llama_cpp import llama_cpp as low

    defaults = low.llama_model_default_params

    def no_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(low, "llama_model_default_params", no_extra_buffers)
        return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=2, verbose=False)


def last_logits_llama_cpp(path: Path, ids: list[list[int]]) -> np.ndarray:
    llm = llama_cpp_model(path)
    rows = []
    for prompt in ids:
        llm.reset()
        llm.eval(prompt)
        rows.append(np.array(llm.scores[len(prompt) - 1], dtype=np.float64))
    llm.close()
    return np.stack(rows)


def last_logits_torch(model, ids: list[list[int]]) -> np.ndarray:
    with torch.no_grad():
        return np.stack([model(torch.tensor([p])).logits[0, -1].double().numpy() for p in ids])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.demo
def test_demo_out_is_the_base_byte_for_byte_except_layer_11(demo_out):
    base, patch, out, report = demo_out
    patched = {f"blk.11.{g}" for g, _ in LAYER_PARTS.values()}
    fields, tensors = assert_identical_except(base, out, patched)
    assert {k for k in fields if k.startswith("layerzo.")} == set(report.metadata_added)
    assert fields["layerzo.base_sha256"].contents() == sha256_of(base)
    assert fields[MARKER_KEY].contents() == patch_fingerprint(patch)
    assert {tensors[n].tensor_type.name for n in patched} == {"F16", "F32"}


@pytest.mark.demo
def test_demo_out_loads_in_transformers_with_the_patch_in_f16(demo_model, demo_out):
    from transformers import AutoModelForCausalLM

    _, patch, out, _ = demo_out
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    state, base = loaded.state_dict(), demo_model.model.state_dict()
    for key, value in patch.tensors.items():
        want = value if value.ndim == 1 else value.half().float()  # norms are F32, matrices F16
        assert torch.equal(state[key], want), key
    assert all(torch.equal(state[k], v) for k, v in base.items() if k not in patch.tensors)


@pytest.mark.demo
def test_demo_patch_effect_agrees_between_llama_cpp_and_transformers(demo_model, demo_out):
    """Measured (5 prompts, last positions, 49152 logits each): corr(Δ llama.cpp, Δ transformers) 0.9987;
    rel |llama.cpp(OUT) - tf(patched)| 0.034 vs |llama.cpp(BASE) - tf(base)| 0.046. Writing q/k rows
    without llama.cpp's permutation gives corr 0.785 and rel 0.42, so both checks have teeth."""
    from layerzo.patch.merge import apply_to_model

    base, patch, out, _ = demo_out
    model = demo_model.model
    ids = [demo_model.tokenizer(p)["input_ids"] for p in PROMPTS]
    tf_base = last_logits_torch(model, ids)
    originals = {k: model.get_parameter(k).detach().clone() for k in patch.tensors}
    try:
        apply_to_model(model, patch)
        tf_patched = last_logits_torch(model, ids)
    finally:
        with torch.no_grad():
            for k, v in originals.items():
                model.get_parameter(k).copy_(v)
    cpp_base, cpp_out = last_logits_llama_cpp(base, ids), last_logits_llama_cpp(out, ids)
    d_tf, d_cpp = tf_patched - tf_base, cpp_out - cpp_base
    assert np.linalg.norm(d_tf) > 0.5 * np.linalg.norm(tf_base)  # the patch changes the logits clearly
    assert np.corrcoef(d_tf.ravel(), d_cpp.ravel())[0, 1] >= 0.98
    assert min(np.corrcoef(a, b)[0, 1] for a, b in zip(d_tf, d_cpp)) >= 0.97
    assert rel(cpp_out, tf_patched) <= 1.5 * rel(cpp_base, tf_base) + 0.01
    assert (cpp_out.argmax(1) == tf_patched.argmax(1)).all()
