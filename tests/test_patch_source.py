"""Patches to and from the Hub: validated before they are published or land in a folder."""

from __future__ import annotations

import pytest

from layerzo.errors import OutputExistsError, PatchError
from layerzo.patch.manifest import CARD_NAME, TRAJECTORY_NAME, WEIGHTS_NAME
from layerzo.patch.source import pull_patch, pull_to_dir, push_patch
from test_io_hub import present, TOKEN, hub, online, patch_dir  # noqa: F401  (hub, online, patch_dir: fixtures)


def test_broken_patch_is_not_pushed(online, hub, patch_dir):
    (patch_dir / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(Exception) as info:
        push_patch(patch_dir, "me/bad", token=TOKEN, endpoint=hub.endpoint)
    assert "sha256" in str(info.value)
    assert "me/bad" not in hub.repos


def test_card_and_trajectory_travel(online, hub, patch_dir, tmp_path):
    push_patch(patch_dir, "me/p5", token=TOKEN, endpoint=hub.endpoint)
    folder, _ = pull_patch("me/p5", token=TOKEN, endpoint=hub.endpoint)
    assert (folder / CARD_NAME).read_text().startswith("---\nbase_model: tiny/llama")
    assert (folder / TRAJECTORY_NAME).read_text() == (patch_dir / TRAJECTORY_NAME).read_text()


def test_push_commits_exactly_the_patch_files_with_a_default_message(online, hub, patch_dir):
    (patch_dir / "notes.txt").write_text("not a patch file")
    push_patch(patch_dir, "me/p6", token=TOKEN, endpoint=hub.endpoint)
    repo = hub.repos["me/p6"]
    assert set(repo.commits[repo.branches["main"]]) == set(present(patch_dir))
    commit = next(r for r in hub.requests if "/commit/main" in r.path)
    assert "layerzo patch: layer(s) 2 of tiny/llama" in commit.body.decode()


def test_pull_to_dir_copies_the_patch_files_and_pins_the_commit(online, hub, patch_dir, tmp_path):
    push_patch(patch_dir, "me/p7", token=TOKEN, endpoint=hub.endpoint)
    out, commit = pull_to_dir("me/p7", tmp_path / "pulled", token=TOKEN, endpoint=hub.endpoint)
    assert out == (tmp_path / "pulled").absolute() and commit == hub.repos["me/p7"].branches["main"]
    assert sorted(p.name for p in out.iterdir()) == sorted(present(patch_dir))
    assert all((out / n).read_bytes() == (patch_dir / n).read_bytes() for n in present(patch_dir))
    assert not any(p.is_symlink() for p in out.iterdir())  # real files, not links into the HF cache
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".pulled")]  # no temp folder left


def test_a_broken_patch_on_the_hub_never_lands_in_the_folder(online, hub, patch_dir, tmp_path):
    push_patch(patch_dir, "me/p8", token=TOKEN, endpoint=hub.endpoint)
    repo = hub.repos["me/p8"]
    files = dict(repo.commits[repo.branches["main"]])
    files[WEIGHTS_NAME] = b"garbage"
    repo.branches["main"] = hub._commit(repo, files)
    with pytest.raises(PatchError, match="sha256"):
        pull_to_dir("me/p8", tmp_path / "pulled", token=TOKEN, endpoint=hub.endpoint)
    assert not [p.name for p in tmp_path.iterdir() if "pulled" in p.name]


def test_pull_to_dir_refuses_an_existing_folder_before_any_download(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):  # offline (conftest): a download would fail differently
        pull_to_dir("me/not-cached", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_push_says_whether_the_repo_is_public_or_private(online, hub, patch_dir):
    from typer.testing import CliRunner

    from layerzo.cli.main import app

    public = push_patch(patch_dir, "me/open", token=TOKEN, endpoint=hub.endpoint)
    assert public.private is False and public.visibility == "public" and "/commit/" in public.commit_url
    hidden = push_patch(patch_dir, "me/closed", token=TOKEN, endpoint=hub.endpoint, private=True)
    assert hidden.private is True and hub.repos["me/closed"].private
    # an existing public repo stays public: --private applies at creation, and the Hub's answer is reported
    again = push_patch(patch_dir, "me/open", token=TOKEN, endpoint=hub.endpoint, private=True)
    assert again.private is False
    result = CliRunner().invoke(app, ["push", str(patch_dir), "me/closed", "--token", TOKEN,
                                      "--endpoint", hub.endpoint])
    assert result.exit_code == 0, result.output
    assert "(the repo is private)" in result.stderr and TOKEN not in result.output
