"""Where patches come from and go to: a Hub repo's patch files, pushed or pulled as a folder.

The transport is :mod:`layerzo.io.hub` (which knows nothing of patches);
this module names the patch files and validates a patch before it is
published or lands in a folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from layerzo.core.atomic import atomic_dir, check_can_write
from layerzo.core.outputs import check_output, output_lock
from layerzo.io import hub
from layerzo.patch.format import LayerPatch
from layerzo.patch.manifest import MANIFEST_NAME, PATCH_FILES
from layerzo.patch.replay import check_replayable


@dataclass(frozen=True)
class PushResult:
    commit_url: str
    private: bool | None  # what the Hub says the repo is now (an existing repo keeps its visibility)

    @property
    def visibility(self) -> str:
        return {True: "private", False: "public", None: "of unknown visibility"}[self.private]


def push_patch(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = False,
               revision: str | None = None, endpoint: str | None = None, commit_message: str | None = None,
               trajectory_only: bool = False) -> PushResult:
    """Upload a saved patch folder (validated first: a broken patch is never published).

    ``trajectory_only`` uploads the manifest, card and trajectory without the
    weights (KBs instead of MBs; users rebuild them from the base). Returns the
    commit URL and whether the repo is private: ``private=True`` only applies
    when the repo is created, so the Hub is asked afterwards.
    """
    hub.check_repo_id(repo_id)
    patch = LayerPatch.from_pretrained(folder)
    m = patch.manifest
    message = commit_message or f"layerzo patch: layer(s) {','.join(map(str, m.layers))} of {m.base_model}"
    with tempfile.TemporaryDirectory(prefix="layerzo-push-") as tmp:
        if trajectory_only and patch.weights_included:
            check_replayable(m)  # a trajectory nobody can replay is no patch
            folder = patch.save_pretrained(Path(tmp) / "patch", weights=False)
        url = hub.upload_folder(folder, repo_id, PATCH_FILES, message, token=token, private=private,
                                revision=revision, endpoint=endpoint)
    return PushResult(url, hub.repo_is_private(repo_id, token=token, endpoint=endpoint))


def pull_patch(repo_id: str, *, revision: str | None = None, token: str | None = None, endpoint: str | None = None,
               cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Download a patch repo's files into the HF cache; returns (snapshot folder, pinned commit sha)."""
    return hub.download_files(repo_id, PATCH_FILES, revision=revision, token=token, endpoint=endpoint,
                              cache_dir=cache_dir, what="patch")


def pull_to_dir(repo_id: str, out_dir: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                endpoint: str | None = None, overwrite: bool = False) -> tuple[Path, str]:
    """``layerzo pull``: fetch, validate, then copy the patch files to ``out_dir`` atomically."""
    out = Path(out_dir).expanduser().absolute()
    check_output(out, inputs=[], overwrite=overwrite, command="layerzo pull", markers=[MANIFEST_NAME])
    check_can_write(out)
    local, commit = pull_patch(repo_id, revision=revision, token=token, endpoint=endpoint)
    LayerPatch.from_pretrained(local)  # validate before anything lands in out_dir
    with output_lock(out, "layerzo pull"), atomic_dir(out, overwrite=overwrite) as tmp:
        for name in PATCH_FILES:
            if (local / name).is_file():
                shutil.copyfile(local / name, tmp / name)  # copyfile follows the cache's symlinks to the blobs
    return out, commit
