"""push / pull against a loopback fake Hub, through the real huggingface_hub client."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_tiny_model
from hub_server import FakeHub
from layerzo.cli.main import app
from layerzo.errors import HubError, OfflineError
from layerzo.patch.source import pull_patch, push_patch
from layerzo.patch.format import LayerPatch
from layerzo.patch.manifest import MANIFEST_NAME, PATCH_FILES, TrajectoryStep
from patch_helpers import make_patch

TOKEN = "hf_layerzoTEST0123456789secretTOKEN"


def present(folder) -> list[str]:
    """The patch files a folder holds (a layer patch has no PEFT adapter files)."""
    return [n for n in PATCH_FILES if (folder / n).is_file()]


@pytest.fixture()
def online(tmp_path, monkeypatch):
    """Online mode with the HF cache in tmp; conftest sets HF_HUB_OFFLINE=1 for everything else."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    return home


@pytest.fixture()
def hub():
    with FakeHub(TOKEN) as server:
        yield server


@pytest.fixture()
def patch_dir(tmp_path):
    steps = [TrajectoryStep(0, (1, 2), (0.5, -0.5), 1e-3)]
    return make_patch(make_tiny_model("llama", seed=4), 2, trajectory=steps).save_pretrained(tmp_path / "patch")


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def test_push_pull_round_trip_is_byte_identical_and_leaks_no_token(online, hub, patch_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["push", str(patch_dir), "me/tiny-patch", "--token", TOKEN, "--endpoint", hub.endpoint,
                                 "--private", "--commit-message", "first patch"])
    assert result.exit_code == 0, result.output
    assert "/me/tiny-patch/commit/" in result.stdout
    assert hub.protocol_errors == []
    assert hub.repos["me/tiny-patch"].private
    # every request carried the token as a Bearer header, and the commit was the NDJSON protocol
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests)
    commit = next(r for r in hub.requests if "/commit/main" in r.path)
    lines = [json.loads(line) for line in commit.body.decode().splitlines()]
    assert lines[0] == {"key": "header", "value": {"summary": "first patch", "description": ""}}
    sent = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines[1:]}
    assert sent == {name: (patch_dir / name).read_bytes() for name in present(patch_dir)}

    out = tmp_path / "pulled"
    result = runner.invoke(app, ["pull", "me/tiny-patch", "-o", str(out), "--token", TOKEN, "--endpoint", hub.endpoint,
                                 "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["revision"] == hub.repos["me/tiny-patch"].branches["main"]
    for name in present(patch_dir):
        assert (out / name).read_bytes() == (patch_dir / name).read_bytes()
    assert hub.protocol_errors == []

    for root in (patch_dir, out, online):  # the token is nowhere on disk: not in the patch, out dir or HF cache
        assert files_containing(root, TOKEN.encode()) == []
    assert not (online / "token").exists()
    assert TOKEN not in result.output


def test_from_pretrained_with_a_repo_id_pins_the_commit(online, hub, patch_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    LayerPatch.from_pretrained(patch_dir).push_to_hub("me/p2")
    first = hub.repos["me/p2"].branches["main"]
    patch = LayerPatch.from_pretrained("me/p2")
    assert (patch.source, patch.source_revision) == ("me/p2", first)
    # a new commit moves main; asking for the old commit still gets the old files
    LayerPatch.from_pretrained(patch_dir).push_to_hub("me/p2", commit_message="again")
    second = hub.repos["me/p2"].branches["main"]
    assert LayerPatch.from_pretrained("me/p2", revision=first).source_revision == first
    folder, sha = pull_patch("me/p2", endpoint=hub.endpoint, token=TOKEN)
    assert sha == second and (folder / MANIFEST_NAME).is_file()


def test_push_to_a_branch(online, hub, patch_dir):
    push_patch(patch_dir, "me/p3", token=TOKEN, endpoint=hub.endpoint, revision="experiment")
    repo = hub.repos["me/p3"]
    assert set(repo.commits[repo.branches["experiment"]]) == set(present(patch_dir))
    assert repo.commits[repo.branches["main"]] == {}


def test_wrong_token_is_one_line_hub_error(online, hub, patch_dir, tmp_path):
    with pytest.raises(HubError) as info:
        push_patch(patch_dir, "me/p4", token="hf_wrong", endpoint=hub.endpoint)
    assert "refused the token" in info.value.one_line() and "hf_wrong" not in info.value.one_line()
    push_patch(patch_dir, "me/p4", token=TOKEN, endpoint=hub.endpoint)
    result = CliRunner().invoke(app, ["pull", "me/p4", "-o", str(tmp_path / "x"), "--token", "hf_wrong",
                                      "--endpoint", hub.endpoint])
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "HTTP 401" in result.stderr
    assert not (tmp_path / "x").exists()


def test_unknown_repo_is_one_line(online, hub):
    with pytest.raises(HubError, match="not found"):
        pull_patch("me/missing", token=TOKEN, endpoint=hub.endpoint)


def test_unsafe_names_in_a_repo_are_refused(online, hub, patch_dir):
    push_patch(patch_dir, "me/evil", token=TOKEN, endpoint=hub.endpoint)
    repo = hub.repos["me/evil"]
    files = dict(repo.commits[repo.branches["main"]])
    files["../../escape.txt"] = b"x"
    repo.branches["main"] = hub._commit(repo, files)
    with pytest.raises(HubError, match="unsafe file name"):
        pull_patch("me/evil", token=TOKEN, endpoint=hub.endpoint)


def test_offline_pull_is_one_line(patch_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE"):
        pull_patch("me/not-cached")
    with pytest.raises(OfflineError):
        push_patch(patch_dir, "me/x", token=TOKEN)
