"""Uploading and downloading a repo's files with the real ``huggingface_hub`` client.

It knows nothing of layer patches: :mod:`layerzo.patch.source` says which files a patch has.

The token comes from the caller or ``$HF_TOKEN`` and is only ever handed to
``HfApi(token=...)`` / ``snapshot_download(token=...)``: layerzo never calls
``login()`` (which would store it on disk), never logs it, and scrubs it from
any error text it re-raises. A pulled patch is pinned to the commit the Hub
resolved, so a download is reproducible.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from layerzo.errors import HubError, OfflineError
from layerzo.core.env import is_offline
from layerzo.io.safetensors import check_file_name

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and ".." not in text and not text.startswith((".", "/", "~"))


def resolve_token(token: str | None) -> str | None:
    return token or os.environ.get("HF_TOKEN") or None


def resolve_endpoint(endpoint: str | None) -> str | None:
    # read at call time: huggingface_hub reads HF_ENDPOINT once, at import
    value = endpoint or os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


def hub_error(action: str, repo_id: str, exc: BaseException, token: str | None) -> HubError:
    """One line naming what failed; the token is scrubbed from anything the server echoed."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    text = " ".join(str(exc).split()) or type(exc).__name__
    if token:
        text = text.replace(token, "***")
    text = text[:300]
    if status in (401, 403):
        return HubError(f"cannot {action} {repo_id}: the Hub refused the token (HTTP {status})",
                        "check --token / $HF_TOKEN and that it has write access" if action == "push to" else
                        "check --token / $HF_TOKEN")
    if status == 404:
        return HubError(f"cannot {action} {repo_id}: repository or revision not found (HTTP 404)",
                        "check the repo id, --revision and that you have access")
    return HubError(f"cannot {action} {repo_id}: {text}")


def client_errors() -> tuple[type[BaseException], ...]:
    """Exceptions the Hub client raises for HTTP and network failures."""
    from huggingface_hub.errors import HfHubHTTPError

    errors: tuple[type[BaseException], ...] = (HfHubHTTPError, OSError, ValueError)
    try:  # huggingface_hub 1.x/2.x talk through httpx (vendored as httpx2 in 2.4)
        import httpx2

        errors += (httpx2.HTTPError,)
    except ImportError:
        pass
    try:
        import httpx

        errors += (httpx.HTTPError,)
    except ImportError:
        pass
    return errors


def check_repo_id(repo_id: str) -> None:
    if not looks_like_repo_id(repo_id):
        raise HubError(f"{repo_id!r} is not a Hub repo id; use the form org/name")


def upload_folder(folder: str | os.PathLike, repo_id: str, files: Sequence[str], message: str, *,
                  token: str | None = None, private: bool = False, revision: str | None = None,
                  endpoint: str | None = None) -> str:
    """Upload ``files`` of ``folder`` to ``repo_id`` (created if missing) in one commit; returns the commit URL."""
    check_repo_id(repo_id)
    if is_offline():
        raise OfflineError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to push")
    token = resolve_token(token)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=resolve_endpoint(endpoint), token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=message, allow_patterns=list(files))
    except client_errors() as exc:
        raise hub_error("push to", repo_id, exc, token) from None
    return str(info.commit_url)


def repo_is_private(repo_id: str, *, token: str | None = None, endpoint: str | None = None) -> bool | None:
    """Whether the Hub says ``repo_id`` is private (None when it does not say)."""
    token = resolve_token(token)
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=resolve_endpoint(endpoint), token=token).model_info(repo_id)
    except client_errors() as exc:
        raise hub_error("read", repo_id, exc, token) from None
    private = getattr(info, "private", None)
    return private if isinstance(private, bool) else None


def download_files(repo_id: str, files: Sequence[str], *, revision: str | None = None, token: str | None = None,
                   endpoint: str | None = None, cache_dir: str | os.PathLike | None = None,
                   what: str = "repo") -> tuple[Path, str]:
    """Download ``files`` of a repo into the HF cache; returns (snapshot folder, pinned commit sha).

    Only the named files are fetched, after checking that the repo lists no
    unsafe names. Offline, a snapshot already in the cache is used.
    """
    check_repo_id(repo_id)
    token = resolve_token(token)
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if is_offline():
        try:
            local = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                      allow_patterns=list(files))
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise OfflineError(f"{what} {repo_id} is not in the local Hub cache and HF_HUB_OFFLINE is set",
                               f"unset HF_HUB_OFFLINE, or pass a local {what} folder") from None
        return Path(local), Path(local).name
    api = HfApi(endpoint=resolve_endpoint(endpoint), token=token)
    try:
        info = api.model_info(repo_id, revision=revision)
        for name in (s.rfilename for s in (info.siblings or [])):
            check_file_name(name, f"Hub repo {repo_id}", HubError)
        if not info.sha:
            raise HubError(f"the Hub returned no commit sha for {repo_id}")
        local = snapshot_download(repo_id, revision=info.sha, token=token, endpoint=resolve_endpoint(endpoint),
                                  cache_dir=cache_dir, allow_patterns=list(files))
    except client_errors() as exc:
        raise hub_error("pull", repo_id, exc, token) from None
    return Path(local), str(info.sha)
