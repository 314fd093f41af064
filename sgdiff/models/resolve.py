"""Turn --model-path (and --revision) into a local diffusers-format folder (a Hub repo id is downloaded),
and tell which commit of a Hub repo that folder holds."""

from __future__ import annotations

import difflib
import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from sgdiff.errors import UserError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
# What one diffusers component folder needs: configs, tokenizer files and safetensors (never pickles).
COMPONENT_FILE_PATTERNS = ("*.json", "*.txt", "*.model", "*.safetensors")


def looks_like_repo_id(model_path: str) -> bool:
    return bool(REPO_ID.match(model_path)) and not model_path.startswith((".", "~"))


# The demo models that ship inside the package (sgdiff/demo/models/), by the names users give them.
DEMO_IMAGE_MODEL, DEMO_VIDEO_MODEL = "sgdiff/demo-image", "sgdiff/demo-video"
DEMO_MODEL_FOLDERS = {DEMO_IMAGE_MODEL: "image", DEMO_VIDEO_MODEL: "video"}


def demo_model_dir(name: str) -> Path:
    """The embedded model's folder, found beside this package (sgdiff/demo/models/, shipped as package
    data) without importing sgdiff.demo."""
    return Path(__file__).parent.parent / "demo" / "models" / DEMO_MODEL_FOLDERS[name]


def is_hub_repo(model_path: str) -> bool:
    """Whether resolve_model_path takes `model_path` as a Hub repo id: no embedded model, no existing path."""
    return model_path not in DEMO_MODEL_FOLDERS and not Path(model_path).expanduser().exists()


def resolve_model_path(model_path: str, revision: str | None = None) -> Path:
    """The folder of `model_path`: an embedded demo model, a local folder, or a Hub repo id fetched (or
    found in the HF cache) at `revision` (a branch, tag or commit hash; default: the repo's main)."""
    if revision is not None:
        check_revision(revision)
    if model_path in DEMO_MODEL_FOLDERS:
        if revision is not None:
            raise UserError(f"`revision` picks a version of a Hub repo; {model_path} is an embedded demo model: "
                            "leave `revision` out", field="revision")  # fmt: skip
        return demo_model_dir(model_path)
    local = Path(model_path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise UserError(
                f"`model` {model_path} is a file; give the checkpoint's folder (with model_index.json)", field="model"
            )
        if revision is not None:
            raise UserError(f"`revision` picks a version of a Hub repo; {model_path} is a local folder: leave "
                            "`revision` out, or give the repo id (owner/name) instead", field="revision")  # fmt: skip
        return local
    if not looks_like_repo_id(model_path):
        raise UserError(
            f"`model` {model_path} does not exist (and is not a Hub repo id like owner/name)", field="model"
        )
    return _download(model_path, revision)


def check_revision(revision: str) -> None:
    """A branch, tag or commit hash as git allows them (no spaces, control characters or '..')."""
    if not revision.strip():
        raise UserError("`revision` is empty: give a branch, tag or commit hash, or leave it out", field="revision")
    if ".." in revision or any(c.isspace() or not c.isprintable() or c in "~^:?*[\\" for c in revision):
        raise UserError(f"`revision` {revision!r} is not a branch, tag or commit hash", field="revision")


def snapshot_commit(folder: Path) -> str | None:
    """The commit a folder holds when it is a snapshot in the HF cache (.../snapshots/<40-hex commit>,
    what a Hub repo id resolves to), else None."""
    real = folder.resolve()
    return real.name if real.parent.name == "snapshots" and COMMIT_HASH.match(real.name) else None


def hub_patterns(model_index: dict) -> list[str]:
    """Files to fetch: model_index.json and the component folders it names, nothing at the repo root
    (FLUX repos also hold 24 GB single-file checkpoints there that sgdiff never reads)."""
    components = [name for name, entry in model_index.items() if not name.startswith("_") and isinstance(entry, list)]
    return ["model_index.json"] + [f"{name}/{pattern}" for name in components for pattern in COMPONENT_FILE_PATTERNS]


HUB_PROBE_SECONDS = 3.0  # how long a connection to the Hub may take before sgdiff calls it unreachable
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(endpoint: str) -> bool:
    """Whether the Hub at `endpoint` surely cannot be reached: its name does not resolve or a connection
    is refused or times out. huggingface_hub would retry for ~25 s first. Behind a proxy nothing is
    probed (the proxy may reach what this machine cannot)."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return False
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError:  # no such name, refused, unreachable, timed out
        return True
    return False


def _download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch (or find in the HF cache) a repo at `revision`; honours HF_HOME, HF_TOKEN and HF_HUB_OFFLINE.
    Where the Hub cannot be reached the cache alone answers, at once. model_index.json decides what else
    is fetched, from the very commit it came from (a branch that moves meanwhile changes nothing)."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = constants.HF_HUB_OFFLINE or hub_unreachable(constants.ENDPOINT)
    at = f" at revision {revision}" if revision is not None else ""
    try:
        index_path = Path(hf_hub_download(repo_id, "model_index.json", revision=revision, local_files_only=offline))
        model_index = json.loads(index_path.read_text(encoding="utf-8"))
        if not isinstance(model_index, dict):
            raise UserError(f"{repo_id}: model_index.json is not a JSON object")
        commit = snapshot_commit(index_path.parent) or revision
        return Path(snapshot_download(repo_id, revision=commit, allow_patterns=hub_patterns(model_index),
                                      local_files_only=offline))  # fmt: skip
    except GatedRepoError:
        raise UserError(f"{repo_id} is gated: accept its licence on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UserError(f"no local folder '{repo_id}' and no Hub repo of that name (private? set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"{repo_id} has no revision {revision or 'main'} on the Hub: give one of its branches, "
                        "tags or commit hashes as `revision`", field="revision") from None  # fmt: skip
    except LocalEntryNotFoundError:
        if revision is not None and cached_repo(constants.HF_HUB_CACHE, repo_id):
            raise UserError(
                f"{repo_id}{at} is not in the local HF cache (other revisions are) and the Hub cannot be reached "
                f"(offline?): download that revision first, or give one that is cached as `revision`",
                field="revision",
            ) from None
        raise UserError(
            f"{repo_id}{at} is not in the local HF cache and the Hub cannot be reached (offline?): "
            f"download it first or pass a local folder{demo_hint(repo_id)}"
        ) from None
    except EntryNotFoundError:
        raise UserError(f"{repo_id}{at} has no model_index.json: it is not a diffusers-format repo") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{repo_id}: model_index.json is not valid JSON") from None


def cached_repo(cache: str | os.PathLike, repo_id: str) -> bool:
    """Whether the HF cache holds some snapshot of `repo_id`."""
    snapshots = Path(cache) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def demo_hint(repo_id: str) -> str:
    """'; did you mean sgdiff/demo-image?' for a name close to an embedded model's, else ''."""
    close = difflib.get_close_matches(repo_id, DEMO_MODEL_FOLDERS, n=1)
    return f"; did you mean {close[0]}?" if close else ""
