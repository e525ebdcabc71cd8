"""The apply report (layerzo.patch.provenance): what it records, for folders and GGUF files alike."""

from __future__ import annotations

import json

from layerzo.patch.provenance import PROVENANCE_NAME, ApplyReport, GGUFApplyReport


def test_a_gguf_report_is_an_apply_report_with_the_tensor_details():
    base = dict(out="o", base="b", base_kind="dir", base_revision=None, patch="p", patch_revision=None, layers=[3])
    folder = ApplyReport(**base)
    gguf = GGUFApplyReport(**{**base, "base_kind": "gguf"}, gguf_type="F16", tensors_copied=7)
    assert isinstance(gguf, ApplyReport) and gguf.to_dict()["gguf_type"] == "F16"
    assert set(folder.to_dict()) < set(gguf.to_dict())  # every field the CLI reads is there for both
    assert json.loads(json.dumps(gguf.to_dict()))["tensors_copied"] == 7
    assert PROVENANCE_NAME.endswith(".json")
