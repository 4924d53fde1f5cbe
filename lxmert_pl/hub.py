"""Checkpoints on the Hugging Face Hub, fetched through `huggingface_hub` into the standard HF cache.

A hub reference is `hf://ORG/NAME[@REVISION]`, or a plain `ORG/NAME` that is not an existing path (see
`parse_hub_ref`). `fetch_hub_files` brings the files into the cache that `transformers` and every other HF tool share
and returns the snapshot folder that holds them. Everything about the transfer is `huggingface_hub`'s:

- the cache location (`HF_HOME`, `HF_HUB_CACHE`), a token for gated or private repos (`HF_TOKEN`, `hf auth login`),
  offline use (`HF_HUB_OFFLINE=1`: only the cache is read), resuming, its progress bars;
- integrity: an LFS file's blob is stored under its sha256 (the hub's ETag) and its size is checked on download;
  `hf cache verify ORG/NAME` re-hashes the cached files against the hub.

Note: `huggingface_hub` reads `HF_HOME`, `HF_HUB_CACHE` and `HF_HUB_OFFLINE` when it is first imported, so set them
before the process starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from lxmert_pl.errors import LxmertPlError

HUB_SCHEME = "hf://"
DEFAULT_REVISION = "main"
# Files that describe a model (LXMERT's config.json, the detector's config.yaml), taken when the repo has them.
CONFIG_FILES = ("config.json", "config.yaml")
# Weight files in order of preference: only the first one the repo holds is fetched (not both copies).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# A file name at the end of a plain `a/b` means a (mistyped) local path, never a repo id.
_LOCAL_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin", ".safetensors", ".json", ".yaml", ".yml", ".tsv", ".npz")
_REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


class HubUnavailableError(LxmertPlError, FileNotFoundError):
    """The hub files could not be had (offline and not cached, unreachable, unknown repo or revision, no access).

    The message is one line: the repo, the revision, the files, why, and how to place them by hand.
    """


@dataclass(frozen=True)
class HubRef:
    """A repository on the Hub, a revision (branch, tag or commit) and the files wanted.

    Empty `files`: those of `CONFIG_FILES` the repo holds plus the first of `WEIGHT_FILES` it holds.
    """

    repo_id: str
    revision: str = DEFAULT_REVISION
    files: tuple[str, ...] = ()
    repo_type: str = "model"  # or "dataset" (hf://datasets/ORG/NAME)

    @property
    def pinned(self) -> bool:
        """Whether `revision` is a commit (a branch such as `main` moves when the repo is updated)."""
        return bool(_COMMIT_RE.fullmatch(self.revision))

    def uri(self, revision: str | None = None) -> str:
        kind = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{HUB_SCHEME}{kind}{self.repo_id}@{revision or self.revision}"


def looks_like_repo_id(text: str) -> bool:
    """`ORG/NAME` with the Hub's characters, and not ending like a weights, config or feature file."""
    return bool(_REPO_ID_RE.fullmatch(text)) and not text.lower().endswith(_LOCAL_SUFFIXES)


def parse_hub_ref(text: str) -> HubRef | None:
    """`hf://ORG/NAME[@REVISION]` or a plain `ORG/NAME[@REVISION]` -> `HubRef`; anything else -> None.

    The caller decides first whether `text` is an existing path (a local folder `org/name` wins).
    `hf://` with a malformed repo id is a `HubUnavailableError` (the user plainly meant the Hub).
    """
    explicit = text.startswith(HUB_SCHEME)
    body = text[len(HUB_SCHEME):] if explicit else text
    repo_id, at, revision = body.partition("@")
    if looks_like_repo_id(repo_id) and (revision or not at):
        return HubRef(repo_id=repo_id, revision=revision or DEFAULT_REVISION)
    if explicit:
        raise HubUnavailableError(f"{text!r}: expected {HUB_SCHEME}ORG/NAME or {HUB_SCHEME}ORG/NAME@REVISION")
    return None


def placement_hint(ref: HubRef, files: tuple[str, ...]) -> str:
    """How to get the files by hand: into the HF cache on a connected machine, or into a folder given as a path."""
    kind = () if ref.repo_type == "model" else ("--repo-type", ref.repo_type)
    command = " ".join(("hf download", ref.repo_id, *files, *kind, "--revision", ref.revision))
    what = ", ".join(files) if files else "its config and weights files"
    return (f"on a connected machine run `{command}` and copy its HF cache (HF_HUB_CACHE, default "
            f"~/.cache/huggingface/hub) here, or put {what} in a folder and pass that folder instead")


def fetch_hub_files(ref: HubRef, *, download: bool = True, progress: bool = True) -> tuple[Path, str]:
    """Bring `ref`'s files into the HF cache; return (snapshot folder holding them, commit they come from).

    `download=False` (or `HF_HUB_OFFLINE=1`) reads the cache only. Raises `HubUnavailableError` (one line naming the
    repo, the revision, the files and how to place them) when any file cannot be had.
    """
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    files = ref.files
    try:
        if not files:
            files = _choose_files(ref, local_only=not download)
        paths = [Path(huggingface_hub.hf_hub_download(ref.repo_id, name, revision=ref.revision,
                                                      repo_type=ref.repo_type, local_files_only=not download,
                                                      tqdm_class=None if progress else _SilentTqdm))
                 for name in files]
    except (hub_errors.HfHubHTTPError, hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled,
            hub_errors.EntryNotFoundError, hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError,
            OSError) as err:
        raise HubUnavailableError(_unavailable_line(ref, files, err, download)) from err
    snapshot = _snapshot_folder(paths[0], files[0])
    return snapshot, snapshot.name


def _choose_files(ref: HubRef, *, local_only: bool) -> tuple[str, ...]:
    """The config files the repo holds and its first weights file: from the cached snapshot when there is one (no
    network needed), else from the Hub's file list."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub import errors as hub_errors

    try:
        snapshot = Path(huggingface_hub.snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True))
        present = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    except hub_errors.LocalEntryNotFoundError:
        if local_only or constants.HF_HUB_OFFLINE:
            raise
        present = set()
    if not any(name in present for name in WEIGHT_FILES) and not (local_only or constants.HF_HUB_OFFLINE):
        unreachable = hub_unreachable(constants.ENDPOINT)
        if unreachable:  # say so at once: huggingface_hub would retry for ~30 s
            raise HubUnavailableError(f"cannot list the files of {ref.uri()}: the Hub could not be reached "
                                      f"({unreachable})")
        try:
            present = set(huggingface_hub.list_repo_files(ref.repo_id, revision=ref.revision))
        except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError):
            raise
        except Exception as err:  # the HTTP client's own transport errors (its type differs between versions)
            raise HubUnavailableError(f"cannot list the files of {ref.uri()}: the Hub could not be reached "
                                      f"({type(err).__name__}: {err}); {placement_hint(ref, ())}") from err
    weights = [name for name in WEIGHT_FILES if name in present][:1]
    if not weights and present and (local_only or constants.HF_HUB_OFFLINE):
        raise HubUnavailableError(f"the HF cache's copy of {ref.uri()} is incomplete: it has "
                                  f"{', '.join(sorted(present))} but none of the weight files "
                                  f"({', '.join(WEIGHT_FILES)}), and downloading is off (HF_HUB_OFFLINE or "
                                  f"download=False); {placement_hint(ref, ())}")
    if not weights:
        raise HubUnavailableError(f"{ref.uri()} holds none of the weight files {', '.join(WEIGHT_FILES)} "
                                  f"(it has: {', '.join(sorted(present)) or 'nothing'})")
    return tuple(name for name in CONFIG_FILES if name in present) + tuple(weights)


def hub_unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why the Hub's host cannot be reached (no DNS, no route, refused), or None when a connection opens or a
    proxy is configured (then huggingface_hub's own requests decide)."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    parts = urlsplit(endpoint)
    try:
        socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout).close()
    except OSError as err:
        return f"{parts.hostname}: {err}"
    return None


def _snapshot_folder(path: Path, relpath: str) -> Path:
    """The `snapshots/<commit>` folder above a cached file (files may sit in subfolders of it)."""
    folder = path.parent
    for _ in PurePosixPath(relpath).parts[1:]:
        folder = folder.parent
    return folder


def _unavailable_line(ref: HubRef, files: tuple[str, ...], err: BaseException, download: bool) -> str:
    """One line: which repo and files, why (offline, not cached, not found, no access), and how to place them."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hub_errors

    if isinstance(err, (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled)):
        if constants.HF_HUB_OFFLINE:
            because = "HF_HUB_OFFLINE=1 forbids downloading"
        elif not download:
            because = "downloading is disabled"
        else:
            because = "the Hub could not be reached"
        why = f"not in the HF cache ({constants.HF_HUB_CACHE}) and {because}"
    elif isinstance(err, hub_errors.RepositoryNotFoundError):
        why = "the repository does not exist or needs a token (set HF_TOKEN or run `hf auth login`)"
    elif isinstance(err, hub_errors.RevisionNotFoundError):
        why = f"the repository has no revision {ref.revision!r}"
    elif isinstance(err, hub_errors.EntryNotFoundError):
        why = "the repository does not hold them at that revision"
    else:
        why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    wanted = ", ".join(files) if files else "its config and weights"
    return f"cannot get {wanted} of {ref.uri()}: {why}; {placement_hint(ref, files)}"


class _SilentTqdm(tqdm):
    """The progress bar class passed to huggingface_hub when the caller asked for no progress output."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)
