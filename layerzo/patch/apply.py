"""Applying a layer patch: in memory to a model, or on disk to a whole checkpoint.

On disk the merge is shard-aware and lazy (mergekit-style): the base index's
``weight_map`` says which shard(s) hold the patched keys; only those are
rewritten (streamed tensor by tensor, original shard metadata kept); every
other shard is hard-linked (or copied) and config/tokenizer files are copied
unchanged. Everything is checked BEFORE anything is written (architecture,
layer count, keys, shapes, fingerprints, dtypes, finiteness), the output is
built in a temp dir beside ``out`` and renamed into place, and the base is
never written to.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Mapping

from layerzo.core.atomic import atomic_dir, check_can_write
from layerzo.core.outputs import check_output, output_lock
from layerzo.errors import BaseMismatchError, ConfigError, ModelLoadError, OutputExistsError
from layerzo.io import hub
from layerzo.model.loading import check_model_folder, read_model_config, resolve_source
from layerzo.patch.format import LayerPatch
from layerzo.patch.provenance import PROVENANCE_NAME, ApplyReport
from layerzo.patch.merge import apply_to_model, check_model_identity, merge_tensors
from layerzo.patch.replay import with_weights
from layerzo.io.safetensors import INDEX_NAME, CheckpointReader, ShardView, write_shard

_HUB_BASE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


# ---------------------------------------------------------------------------- on disk
def apply_patch(base: str | os.PathLike | None, patch: LayerPatch | str | os.PathLike, out: str | os.PathLike, *,
                overwrite: bool = False, force: bool = False, revision: str | None = None, token: str | None = None,
                log: Callable[[str], None] | None = None, gguf_type: str | None = None) -> ApplyReport:
    """Write a complete HF checkpoint ``out`` = ``base`` with ``patch`` applied (an ``out`` ending in .gguf: a GGUF).

    ``base``: checkpoint dir (single file or sharded), Hub id, or .gguf (the
    dequantized model is rebuilt and saved as safetensors). An ``out`` ending in
    ``.gguf`` writes a GGUF instead (:func:`layerzo.patch.gguf.apply_patch_gguf`:
    ``base`` must be a .gguf; ``gguf_type`` F16 (default), F32, Q8_0 or the base's own).
    """
    if str(out).lower().endswith(".gguf"):
        from layerzo.patch.gguf import apply_patch_gguf

        return apply_patch_gguf(base, patch, out, gguf_type=gguf_type, overwrite=overwrite, force=force,
                                token=token, log=log)
    if gguf_type is not None:
        raise ConfigError("--gguf-type applies only to a .gguf output", "give an OUT ending in .gguf")
    patch_path = patch.source if isinstance(patch, LayerPatch) else patch
    plan = check_output(out, inputs=[base, patch_path], overwrite=overwrite, command="layerzo apply",
                        markers=[PROVENANCE_NAME])  # before anything is read or deleted
    check_can_write(out)
    with output_lock(out, "layerzo apply"):
        if plan.replaces and log:
            log(plan.note("layerzo apply"))
        if not isinstance(patch, LayerPatch):
            patch = LayerPatch.from_pretrained(patch, token=token)
        return _apply_patch(base, patch, Path(out).expanduser().absolute(), overwrite=overwrite, force=force,
                            revision=revision, token=token, log=log)


def _apply_patch(base, patch: LayerPatch, out: Path, *, overwrite: bool, force: bool, revision: str | None,
                 token: str | None, log: Callable[[str], None] | None) -> ApplyReport:
    patch = with_weights(patch, base, revision=revision)  # a trajectory-only patch: rebuilt from the base first
    source = resolve_source(base, revision)
    base_dir, base_revision = None, source.revision
    if source.kind == "hub":
        base_dir, base_revision = _download_base(source.location, revision, token)
    elif source.kind == "dir":
        base_dir = Path(source.location)
    if base_dir is not None and out.resolve() == base_dir.resolve():
        raise OutputExistsError(f"{out} is the base checkpoint; layerzo never writes into the base")
    checked = read_base(base_dir) if base_dir is not None else None  # a damaged base is refused before any write
    report = ApplyReport(out=str(out), base=source.name, base_kind=source.kind, base_revision=base_revision,
                         patch=patch.source, patch_revision=patch.source_revision, layers=list(patch.manifest.layers))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if checked is not None:
            _apply_to_dir(checked, patch, tmp, report, force=force, log=log)
        else:
            _apply_to_gguf(source.location, patch, tmp, report, force=force)
        (tmp / PROVENANCE_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return report


def read_base(base_dir: Path) -> tuple[CheckpointReader, dict]:
    """The base checkpoint's reader and config.json, checked whole before anything is written or linked.

    The folder must be a model with a config.json transformers knows, and every
    safetensors file in it (the indexed shards and any other) structurally sound:
    header parses, data length = file size, every key the index maps to a shard
    present in that shard's header. Only headers are read, so this is cheap.
    """
    check_model_folder(base_dir)
    config = read_model_config(base_dir, custom_code=True)  # apply runs no model code: a custom one is fine
    reader = CheckpointReader(base_dir)
    reader.check_shards(also=[p.name for p in sorted(base_dir.glob("*.safetensors"))])
    return reader, config


def _apply_to_dir(checked: tuple[CheckpointReader, dict], patch: LayerPatch, tmp: Path, report: ApplyReport, *,
                  force: bool, log: Callable[[str], None] | None) -> None:
    reader, config = checked
    base_dir = reader.directory
    check_model_identity(patch, list(config.get("architectures") or []), _config_layers(config))
    key_map = map_keys(list(patch.manifest.base_fingerprint), reader.weight_map, lambda: _base_model_prefix(config))
    base = reader.tensors([key_map[k] for k in key_map])  # only the patched tensors are read
    merged, notes = merge_tensors(patch, {k: base[key_map[k]] for k in key_map}, force=force)
    del base
    report.notes += notes + [f"patch key {k} is stored as {v} in the base" for k, v in key_map.items() if k != v]
    by_shard: dict[str, dict] = {}
    for key, value in merged.items():
        by_shard.setdefault(reader.weight_map[key_map[key]], {})[key_map[key]] = value
    for entry in sorted(base_dir.iterdir()):
        target = tmp / entry.name
        if entry.name in by_shard:
            if log:
                log(f"rewriting {entry.name} ({len(by_shard[entry.name])} patched tensors)")
            with ShardView(entry, by_shard[entry.name]) as view:
                write_shard(target, view, view.header.metadata)
            report.rewritten.append(entry.name)
        elif entry.name.startswith(".") or entry.name == PROVENANCE_NAME:
            continue  # VCS/cache folders and an older apply's provenance are not part of the model
        elif entry.is_dir():
            shutil.copytree(entry, target)
            report.copied.append(entry.name + "/")
        elif entry.suffix == ".safetensors":
            try:
                os.link(entry, target)  # follows symlinks (Hub cache snapshots point at blobs)
                report.linked.append(entry.name)
            except OSError:
                shutil.copy2(entry, target)
                report.copied.append(entry.name)
        else:
            shutil.copy2(entry, target)
            report.copied.append(entry.name)


def _apply_to_gguf(gguf: str, patch: LayerPatch, tmp: Path, report: ApplyReport, *, force: bool) -> None:
    """GGUF base: dequantize, patch in memory, rebuild a plain model (transformers refuses to
    save a GGUF-loaded one) and save it + its tokenizer as a safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from layerzo.model.loading import load_model

    loaded = load_model(gguf, dtype="float32")
    report.notes += apply_to_model(loaded.model, patch, force=force)
    state = loaded.model.state_dict()
    config = loaded.model.config
    del loaded.model
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k not in _tied_keys(rebuilt)]:
        raise ModelLoadError(f"cannot rebuild the GGUF model as a plain checkpoint: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    rebuilt.tie_weights()
    rebuilt.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    report.rewritten.append("(whole model, dequantized from GGUF)")


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied) if not isinstance(tied, dict) else set(tied)


def map_keys(patch_keys: list[str], checkpoint_keys: Mapping[str, str] | list[str],
             prefix: str | None | Callable[[], str | None]) -> dict[str, str]:
    """Patch (state-dict) key -> checkpoint key: exact match, else with the base_model_prefix
    stripped or added (old GPT-2 checkpoints store ``h.0...`` for ``transformer.h.0...``).

    ``prefix`` may be a callable, asked only when some key has no exact match
    (finding it imports the model class, which costs seconds).
    """
    keys = set(checkpoint_keys)
    mapping = {}
    for key in patch_keys:
        if key in keys:
            mapping[key] = key
            continue
        if callable(prefix):
            prefix = prefix()
        candidates = []
        if prefix:
            if key.startswith(prefix + "."):
                candidates.append(key[len(prefix) + 1:])
            candidates.append(f"{prefix}.{key}")
        found = next((c for c in candidates if c in keys), None)
        if found is None:
            raise BaseMismatchError(f"the base checkpoint has no tensor {key}", "apply the patch to the base model named in it")
        mapping[key] = found
    return mapping


def _config_layers(config: dict) -> int | None:
    for source in (config, config.get("text_config") or {}):
        for name in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(source.get(name), int):
                return source[name]
    return None


def _base_model_prefix(config: dict) -> str | None:
    """``base_model_prefix`` of the model class for this config (``model``, ``transformer``, ...)."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type", ""))
        return getattr(getattr(transformers, name), "base_model_prefix", None) if name else None
    except (ImportError, AttributeError):
        return None


def _download_base(repo_id: str, revision: str | None, token: str | None) -> tuple[Path, str]:
    local_path, commit = hub.download_files(repo_id, _HUB_BASE_PATTERNS, revision=revision, token=token, what="base model")
    if not (local_path / INDEX_NAME).is_file() and not (local_path / "model.safetensors").is_file():
        raise ModelLoadError(f"Hub model {repo_id} has no safetensors weights (pickled .bin checkpoints are refused)")
    return local_path, commit
