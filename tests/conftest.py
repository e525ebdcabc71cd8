"""Shared fixtures: tiny random models of several architectures, a tiny
checkpoint saved sharded on disk once per session, the real benchmark data
in ../shared/data, and (for the few ``demo`` tests) the SmolLM2-135M model.
"""

from __future__ import annotations

import os
from pathlib import Path

# Tiny models are dominated by per-op overhead, and a second intra-op thread
# only oversubscribes a 2-core CI machine that also runs torchrun workers.
# Set before torch is imported so subprocesses (torchrun, CLI runs) inherit it
# and every process in a bit-exactness comparison uses the same thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

TINY_VOCAB = 49152  # the demo tokenizer's vocabulary, so tiny models share its tokenizer


def tiny_config(arch: str = "llama", num_layers: int = 4, vocab_size: int = TINY_VOCAB):
    """A few-hundred-kB config of the given architecture (random init)."""
    import transformers as tf

    h, heads, inter = 32, 4, 64
    if arch == "llama":
        return tf.LlamaConfig(vocab_size=vocab_size, hidden_size=h, intermediate_size=inter,
                              num_hidden_layers=num_layers, num_attention_heads=heads,
                              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    if arch == "qwen2":
        return tf.Qwen2Config(vocab_size=vocab_size, hidden_size=h, intermediate_size=inter,
                              num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
                              max_position_embeddings=512, tie_word_embeddings=True)
    if arch == "qwen3":
        return tf.Qwen3Config(vocab_size=vocab_size, hidden_size=h, intermediate_size=inter,
                              num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
                              head_dim=8, max_position_embeddings=512, tie_word_embeddings=True)
    if arch == "mistral":
        return tf.MistralConfig(vocab_size=vocab_size, hidden_size=h, intermediate_size=inter,
                                num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
                                max_position_embeddings=512, tie_word_embeddings=True)
    if arch == "gemma":
        return tf.GemmaConfig(vocab_size=vocab_size, hidden_size=h, intermediate_size=inter,
                              num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
                              head_dim=8, max_position_embeddings=512)
    if arch == "phi3":
        return tf.Phi3Config(vocab_size=vocab_size, hidden_size=h, intermediate_size=inter,
                             num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
                             max_position_embeddings=512, pad_token_id=0, tie_word_embeddings=True)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=h, n_layer=num_layers, n_head=heads, n_positions=512)
    if arch == "opt":
        return tf.OPTConfig(vocab_size=vocab_size, hidden_size=h, ffn_dim=inter, num_hidden_layers=num_layers,
                            num_attention_heads=heads, max_position_embeddings=512, word_embed_proj_dim=h)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=h, intermediate_size=inter,
                                num_hidden_layers=num_layers, num_attention_heads=heads,
                                max_position_embeddings=512)
    raise ValueError(arch)


TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt2", "opt", "gpt_neox")


def make_tiny_model(arch: str = "llama", num_layers: int = 4, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, num_layers), dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (SHARED_DATA / "sst2" / "train.jsonl").is_file():
        pytest.fail(f"benchmark data not found at {SHARED_DATA}; the repo expects ../shared/data beside it")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The demo model's tokenizer, extracted from the GGUF once and saved as tokenizer.json."""
    from transformers import AutoTokenizer

    from layerzo.model.loading import demo_model_path

    gguf = demo_model_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture()
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny Llama checkpoint with tokenizer, saved as 3 safetensors shards + index.

    Shards are written by hand (save_pretrained would put all tiny layers in one
    shard): 1 = embeddings + layer 0; 2 = layer 1 + the first half of layer 2's
    keys; 3 = the rest of layer 2 + layer 3 + final norm. So layer 2 straddles a
    shard boundary, as big checkpoints' layers do. Shards keep ``format: pt``.
    """
    import json
    import shutil

    from safetensors.torch import save_file

    model = make_tiny_model("llama", num_layers=4, seed=1)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    (out / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    layer2 = sorted(k for k in state if k.startswith("model.layers.2."))
    shard_of = {}
    for key in state:
        if key.startswith(("model.embed_tokens.", "model.layers.0.")):
            shard_of[key] = 1
        elif key.startswith("model.layers.1.") or key in layer2[: len(layer2) // 2]:
            shard_of[key] = 2
        else:
            shard_of[key] = 3
    names = {i: f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)}
    for i, name in names.items():
        save_file({k: v for k, v in state.items() if shard_of[k] == i}, out / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": {k: names[shard_of[k]] for k in sorted(state)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def demo_model():
    """The real SmolLM2-135M-Instruct demo model (loaded once per session; ~15-35 s)."""
    from layerzo.model.loading import load_model

    return load_model(None)


def crash_after_a_checkpoint_then_resume(config, out, monkeypatch, **resume_kwargs):
    """``tune(config, out)`` crashes right after saving its first checkpoint (an OSError raised from
    ``save_checkpoint``); then ``tune(..., resume=True)`` finishes the run. Returns the resumed result."""
    import layerzo.tune.loop as loop

    real = loop.save_checkpoint

    def save_then_crash(folder, ckpt):
        real(folder, ckpt)
        raise OSError("simulated crash after the checkpoint")

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(OSError, match="simulated crash"):
        loop.tune(config, out, progress=False)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    return loop.tune(config, out, progress=False, resume=True, **resume_kwargs)
