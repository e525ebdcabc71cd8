"""What an on-disk apply did: the report returned by ``layerzo apply`` and written beside its output.

A folder output holds it as ``layerzo_apply.json`` (which also marks the folder
as an earlier ``layerzo apply`` output for ``--overwrite``); a GGUF output
carries the same facts in its ``layerzo.*`` metadata keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

PROVENANCE_NAME = "layerzo_apply.json"


@dataclass
class ApplyReport:
    """What ``apply_patch`` did (also written to ``out/layerzo_apply.json``)."""

    out: str
    base: str
    base_kind: str
    base_revision: str | None
    patch: str | None
    patch_revision: str | None
    layers: list[int]
    rewritten: list[str] = field(default_factory=list)
    linked: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GGUFApplyReport(ApplyReport):
    """:class:`ApplyReport` of a GGUF output: the type written and what was rewritten or copied, tensor by tensor."""

    gguf_type: str = ""
    base_sha256: str = ""
    patch_fingerprint: str = ""
    tensors_rewritten: dict[str, str] = field(default_factory=dict)  # GGUF name -> type written
    tensors_copied: int = 0
    metadata_added: list[str] = field(default_factory=list)
