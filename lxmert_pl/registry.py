"""Checkpoint registry: short aliases for the checkpoints lxmert_pl reads, and a resumable, verified downloader.

The registry is `checkpoints/registry.yaml` (its comments describe the fields). `resolve_checkpoint` turns a path, an
alias or a Hugging Face Hub reference into a local path, in this order:

1. an existing path is passed through untouched;
2. an alias: a `hub:` alias is fetched by `huggingface_hub` into the standard HF cache (`lxmert_pl.hub`: HF_HOME,
   HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE are honoured); any other alias is looked up under the checkpoints folder
   and downloaded there by `download_file` when it is missing;
3. `hf://ORG/NAME[@REVISION]`, or a plain `ORG/NAME` that is not a path: fetched from the Hub like a `hub:` alias.

Where the checkpoints folder is: the argument `checkpoints_dir`, else the environment variable `LXMERT_PL_CHECKPOINTS`,
else the repository's `checkpoints/` folder. Bundled entries (demo checkpoints that ship with the repository) are
always read from the folder that holds their registry file.

`download_file` is for files on servers other than the Hub (the UNC server's `model_LXRT.pth`), which publish no
checksums and are not covered by any shared cache: it stays hand-written for them.

`download_file` streams into `<dest>.part`, resumes a partial `.part` with an HTTP Range request (restarting when the
server ignores it), checks the size and sha256 when the registry knows them, and renames the file into place only
after that check. The digest it computed is written next to the file as `<dest>.sha256` (`sha256sum` format).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import yaml
from tqdm import tqdm

from lxmert_pl import __version__
from lxmert_pl.errors import LxmertPlError
from lxmert_pl.hub import HubRef, HubUnavailableError, fetch_hub_files, parse_hub_ref

logger = logging.getLogger(__name__)

FORMATS = ("lxrt-pretrain", "lxrt-finetuned", "hf", "lightning", "frcnn-hf", "frcnn-caffe", "vocab")
BUNDLED = "bundled"
ENV_CHECKPOINTS = "LXMERT_PL_CHECKPOINTS"
REPO_CHECKPOINTS_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
DEFAULT_REGISTRY = REPO_CHECKPOINTS_DIR / "registry.yaml"
CHUNK_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 30.0
USER_AGENT = f"lxmert_pl/{__version__}"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_HUB_URL_RE = re.compile(r"https?://(www\.)?(huggingface\.co|hf\.co)/")
CAFFEMODEL_SUFFIX = ".caffemodel"


class RegistryError(LxmertPlError):
    """Base class of the errors raised here; also raised for a malformed registry file."""


class UnknownCheckpointError(RegistryError, LookupError):
    """Neither an existing path nor a known alias; the message lists the aliases."""


class CheckpointUnavailableError(RegistryError, FileNotFoundError):
    """A known alias whose files are missing and were not downloaded; the message says what to put where."""


class DownloadError(RegistryError):
    """The server could not be reached, refused the file, or the transfer broke off (the `.part` is kept)."""


class VerificationError(RegistryError):
    """A downloaded file has the wrong size or sha256; the message gives expected and got, the `.part` is deleted."""


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file: `relpath` is its place under the checkpoints folder."""

    relpath: str
    url: str
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Entry:
    """One registry alias.

    `downloads` is empty for bundled, hub and manual-only entries; `bundled_dir` is set only for bundled entries (the
    folder holding the registry file); `manual` is a page to fetch the checkpoint from by hand; `hub` is set only for
    Hugging Face Hub entries (their `file` is the repo id: they live in the HF cache, not the checkpoints folder).
    `geometry` is a detector's default proposal geometry ("port" or "caffe", see `lxmert_pl.detector.geometry`), None
    otherwise.
    """

    alias: str
    file: str
    format: str
    description: str
    downloads: tuple[RemoteFile, ...] = ()
    bundled_dir: Path | None = None
    manual: str | None = None
    hub: HubRef | None = None
    geometry: str | None = None


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A local checkpoint path; `alias`, `format` and `description` are None for a path given directly.

    `source` says where a Hub checkpoint came from, as `hf://ORG/NAME@COMMIT` (the commit the cache holds); None for
    everything else. `geometry` is a detector's default proposal geometry (None for a path given directly;
    a `.caffemodel` path gets format `frcnn-caffe`, geometry `caffe`).
    """

    path: Path
    alias: str | None = None
    format: str | None = None
    description: str | None = None
    geometry: str | None = None
    source: str | None = None

    @property
    def is_bundled_demo(self) -> bool:
        """True for the registry's bundled demo aliases (`demo-*`); never for a path, whatever its name."""
        return self.alias is not None and self.alias.startswith("demo-")

    def describe(self) -> str:
        """Say plainly which weights these are; bundled demo weights are named as such."""
        if self.is_bundled_demo:
            real = "--detector frcnn-vg-finetuned" if str(self.format).startswith("frcnn") else "--ckpt lxr955"
            return (f"{self.alias} = the BUNDLED DEMO weights ({self.description}); their scores mean something "
                    f"only on the bundled sample data: use {real} for real images. File: {self.path}")
        origin = f"{self.source} (in the HF cache: {self.path})" if self.source else str(self.path)
        if self.alias:
            return f"{self.alias} ({self.description}) from {origin}"
        return origin


# ----------------------------------------------------------------------------------------------- registry file


def default_checkpoints_dir() -> Path:
    """`$LXMERT_PL_CHECKPOINTS` when set, else the repository's `checkpoints/` folder."""
    override = os.environ.get(ENV_CHECKPOINTS)
    return Path(override).expanduser() if override else REPO_CHECKPOINTS_DIR


def load_registry(path: str | os.PathLike[str] | None = None) -> dict[str, Entry]:
    """Read a registry YAML (default: `checkpoints/registry.yaml`) into `{alias: Entry}`, validating every entry."""
    path = Path(path) if path is not None else DEFAULT_REGISTRY
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: expected a mapping of aliases to entries")
    return {str(alias): _parse_entry(str(alias), fields, path) for alias, fields in raw.items()}


def _parse_entry(alias: str, fields: Any, registry_path: Path) -> Entry:
    """Validate one alias's fields and build its `Entry`."""
    where = f"{registry_path}: entry '{alias}'"
    needed = ("format", "description") if isinstance(fields, dict) and "hub" in fields else ("file", "format",
                                                                                            "description")
    if not isinstance(fields, dict) or not all(key in fields for key in needed):
        raise RegistryError(f"{where}: needs at least `file` (or `hub`), `format` and `description`")
    if fields["format"] not in FORMATS:
        raise RegistryError(f"{where}: format {fields['format']!r} is not one of {', '.join(FORMATS)}")
    geometry = fields.get("geometry")
    if geometry is not None and not isinstance(geometry, str):
        raise RegistryError(f"{where}: `geometry` must be a detector geometry name (port or caffe), got {geometry!r}")
    if "hub" in fields:
        if fields.get("source") is not None:
            raise RegistryError(f"{where}: give either `hub` or `source`, not both")
        hub = _hub_ref(where, fields["hub"])
        return Entry(alias=alias, file=hub.repo_id, format=fields["format"], description=fields["description"],
                     hub=hub, geometry=geometry)
    entry = Entry(alias=alias, file=str(fields["file"]), format=fields["format"], description=fields["description"],
                  geometry=geometry)
    source = fields.get("source")
    if source == BUNDLED:
        return replace(entry, bundled_dir=registry_path.parent.resolve())
    if isinstance(source, str):
        return replace(entry, downloads=(_remote_file(where, entry.file, source, fields),))
    if isinstance(source, list):
        return replace(entry, downloads=tuple(_dir_file(where, entry.file, item) for item in source))
    if source is None and fields.get("manual"):
        return replace(entry, manual=str(fields["manual"]))
    raise RegistryError(f"{where}: `source` must be a URL, a list of files, {BUNDLED!r}, or null with `manual`")


def _hub_ref(where: str, hub: Any) -> HubRef:
    """Validate a `hub: {repo, revision, files}` mapping; `revision` must be written out (a commit, or `main`)."""
    if not isinstance(hub, dict) or not isinstance(hub.get("repo"), str) or not isinstance(hub.get("revision"), str):
        raise RegistryError(f"{where}: `hub` needs `repo` (ORG/NAME) and `revision` (a commit, or main when none is "
                            f"pinned), got {hub!r}")
    ref = parse_hub_ref(hub["repo"])
    if ref is None or ref.repo_id != hub["repo"]:
        raise RegistryError(f"{where}: hub `repo` must be ORG/NAME, got {hub['repo']!r}")
    files = hub.get("files") or ()
    if not isinstance(files, (list, tuple)) or not all(isinstance(name, str) and name for name in files):
        raise RegistryError(f"{where}: hub `files` must be a list of file names in the repo, got {files!r}")
    return HubRef(repo_id=ref.repo_id, revision=hub["revision"], files=tuple(files))


def _dir_file(where: str, directory: str, item: Any) -> RemoteFile:
    """One file of a directory entry (an item of its `source` list)."""
    if not isinstance(item, dict) or not item.get("file"):
        raise RegistryError(f"{where}: each item of a `source` list needs `file` and `url`")
    return _remote_file(where, f"{directory}/{item['file']}", item.get("url"), item)


def _remote_file(where: str, relpath: str, url: Any, fields: dict[str, Any]) -> RemoteFile:
    """Validate a URL with its optional `sha256` and `size`."""
    sha256, size = fields.get("sha256"), fields.get("size")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise RegistryError(f"{where}: {relpath}: `url` must be an http(s) URL, got {url!r}")
    if _HUB_URL_RE.match(url):
        raise RegistryError(f"{where}: {relpath}: {url} is on the Hugging Face Hub: describe the entry with "
                            f"`hub: {{repo, revision, files}}` (fetched through huggingface_hub), not a URL")
    if sha256 is not None and not _SHA256_RE.fullmatch(str(sha256).lower()):
        raise RegistryError(f"{where}: {relpath}: `sha256` must be 64 hex digits or null, got {sha256!r}")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise RegistryError(f"{where}: {relpath}: `size` must be a byte count or null, got {size!r}")
    return RemoteFile(relpath=relpath, url=url, sha256=str(sha256).lower() if sha256 else None, size=size)


# ----------------------------------------------------------------------------------------------- resolving


def resolve_checkpoint(
    name_or_path: str | os.PathLike[str],
    *,
    checkpoints_dir: str | os.PathLike[str] | None = None,
    registry: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: bool = True,
) -> ResolvedCheckpoint:
    """Turn an existing path, a registry alias or a Hub reference into a local checkpoint path.

    An existing file or directory is returned as is (format None: the loader detects it), even when its name is also
    an alias. A `hub:` alias, `hf://ORG/NAME[@REVISION]` or a plain `ORG/NAME` resolves to its snapshot folder in the
    HF cache, fetched there by huggingface_hub when `download` is true (format None for a reference that is no alias).
    Any other alias resolves under `checkpoints_dir` (see `default_checkpoints_dir`); its missing files are downloaded
    there when `download` is true. Raises `UnknownCheckpointError` (listing the aliases) for anything else, and
    `CheckpointUnavailableError` (saying which file to put where) when the files are missing and cannot be had.
    """
    candidate = Path(name_or_path).expanduser()
    if candidate.exists():
        if candidate.suffix == CAFFEMODEL_SUFFIX:  # the original caffe detector: it only runs with its own geometry
            return ResolvedCheckpoint(path=candidate, format="frcnn-caffe", geometry="caffe")
        return ResolvedCheckpoint(path=candidate)
    registry_path = Path(registry) if registry is not None else DEFAULT_REGISTRY
    entries = load_registry(registry_path)
    entry = entries.get(str(name_or_path))
    if entry is None:
        try:
            ref = parse_hub_ref(str(name_or_path))
        except HubUnavailableError as err:
            raise UnknownCheckpointError(str(err)) from None
        if ref is not None:
            return _resolve_hub(ref, None, download=download, progress=progress)
        raise UnknownCheckpointError(
            f"{str(name_or_path)!r} is neither an existing file or directory, nor a checkpoint alias, nor a Hugging "
            f"Face Hub reference (hf://ORG/NAME[@REVISION]); known aliases (from {registry_path}): "
            f"{', '.join(sorted(entries))}"
        )
    if entry.hub is not None:
        return _resolve_hub(entry.hub, entry, download=download, progress=progress)
    root = entry.bundled_dir or Path(checkpoints_dir or default_checkpoints_dir()).expanduser()
    _fetch_missing(entry, root, download=download, progress=progress)
    return ResolvedCheckpoint(path=root / entry.file, alias=entry.alias, format=entry.format,
                              description=entry.description, geometry=entry.geometry)


def _resolve_hub(ref: HubRef, entry: Entry | None, *, download: bool, progress: bool) -> ResolvedCheckpoint:
    """Fetch a Hub checkpoint through huggingface_hub; a missing one is a one-line `CheckpointUnavailableError`."""
    try:
        snapshot, commit = fetch_hub_files(ref, download=download, progress=progress)
    except HubUnavailableError as err:
        prefix = f"checkpoint {entry.alias!r}: " if entry else ""
        raise CheckpointUnavailableError(prefix + str(err)) from err
    if not ref.pinned:
        logger.info("%s: revision %s is not pinned; the cache holds commit %s", ref.repo_id, ref.revision, commit)
    return ResolvedCheckpoint(path=snapshot, alias=entry.alias if entry else None,
                              format=entry.format if entry else None,
                              description=entry.description if entry else None,
                              geometry=entry.geometry if entry else None, source=ref.uri(commit))


def _fetch_missing(entry: Entry, root: Path, *, download: bool, progress: bool) -> None:
    """Download the entry's missing files into `root`, or raise `CheckpointUnavailableError`."""
    if not entry.downloads:
        if not (root / entry.file).exists():
            raise _unavailable(entry, root, [], "it is missing")
        return
    missing = [remote for remote in entry.downloads if not (root / remote.relpath).exists()]
    if missing and not download:
        raise _unavailable(entry, root, missing, "it is missing and downloading is disabled (download=False)")
    for index, remote in enumerate(missing):
        try:
            download_file(remote.url, root / remote.relpath, sha256=remote.sha256, size=remote.size, progress=progress)
        except DownloadError as err:
            raise _unavailable(entry, root, missing[index:], f"the download failed ({err})") from err


def _unavailable(entry: Entry, root: Path, missing: list[RemoteFile], reason: str) -> CheckpointUnavailableError:
    """The error for a known alias that cannot be made available: why, and what to put where."""
    lines = [f"checkpoint {entry.alias!r} is not available: {reason}."]
    if missing:
        lines.append("Download it yourself:")
        lines += [f"  put {Path(r.relpath).name} at {root / r.relpath}\n    from {r.url}" for r in missing]
    else:
        target = root / entry.file
        origin = f"fetch it by hand from {entry.manual}" if entry.manual else "it ships with the repository"
        lines.append(f"  put {target.name} at {target} ({origin})")
    return CheckpointUnavailableError("\n".join(lines))


# ----------------------------------------------------------------------------------------------- downloading


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    sha256: str | None = None,
    size: int | None = None,
    progress: bool = True,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> str:
    """Download `url` to `dest` and return the file's sha256 (hex).

    Streams into `<dest>.part` (resuming an existing one with a Range request), verifies `size` and `sha256` when
    given, then renames the file to `dest` and records the digest in `<dest>.sha256`. Without `sha256` the download
    is logged as unverified. `timeout` (seconds) bounds the connection and every read. Raises `DownloadError` when the
    transfer fails (a partial `.part` is kept for the next try) and `VerificationError` on a size or sha256 mismatch
    (the `.part` is deleted).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    got = _fetch(url, part, progress=progress, timeout=timeout).hexdigest()
    _verify(url, part, got, sha256=sha256, size=size)
    os.replace(part, dest)
    dest.with_name(dest.name + ".sha256").write_text(f"{got}  {dest.name}\n", encoding="utf-8")
    if sha256 is None:
        logger.warning("could not verify %s: no sha256 is known for it; computed %s (recorded in %s.sha256)",
                       dest, got, dest.name)
    return got


def _fetch(url: str, part: Path, *, progress: bool, timeout: float) -> "hashlib._Hash":
    """Bring `part` up to the whole file (resuming when the server allows) and return its running sha256."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as err:
        if err.code == 416 and offset:  # the .part does not fit the file (e.g. the file changed): start over
            logger.info("server rejected resuming %s at byte %d; restarting", url, offset)
            part.unlink()
            return _fetch(url, part, progress=progress, timeout=timeout)
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
    except (URLError, OSError, http.client.HTTPException) as err:
        raise DownloadError(f"cannot reach {url}: {getattr(err, 'reason', err)}") from err
    with response:
        resumed = bool(offset) and response.status == 206
        if offset and not resumed:
            logger.info("server ignored the Range request for %s; restarting from byte 0", url)
        digest = _sha256_of(part) if resumed else hashlib.sha256()
        with part.open("ab" if resumed else "wb") as out:
            _stream(response, out, digest, start=offset if resumed else 0, label=part.name[: -len(".part")],
                    progress=progress)
    return digest


def _stream(response: http.client.HTTPResponse, out: BinaryIO, digest: "hashlib._Hash", *, start: int, label: str,
            progress: bool) -> None:
    """Copy the response body to `out`, updating `digest` and a byte progress bar; detect a cut-off transfer."""
    length = response.headers.get("Content-Length")
    expected = int(length) if length is not None else None
    received = 0
    with tqdm(total=None if expected is None else start + expected, initial=start, unit="B", unit_scale=True,
              unit_divisor=1024, desc=label, disable=not progress) as bar:
        try:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
                received += len(chunk)
        except (OSError, http.client.HTTPException) as err:
            raise DownloadError(f"transfer of {response.url} broke off after {start + received} bytes ({err}); "
                                f"the partial file {out.name} is kept and resumed on the next try") from err
    if expected is not None and received < expected:
        raise DownloadError(f"transfer of {response.url} ended after {start + received} of {start + expected} "
                            f"bytes; the partial file {out.name} is kept and resumed on the next try")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's content (what `<file>.sha256` records and model cards quote)."""
    return _sha256_of(Path(path)).hexdigest()


def _sha256_of(path: Path) -> "hashlib._Hash":
    """Running sha256 of a file's current content."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest


def _verify(url: str, part: Path, got: str, *, sha256: str | None, size: int | None) -> None:
    """Check the finished `.part` against the expected size and digest; delete it and raise on a mismatch."""
    actual = part.stat().st_size
    problems = []
    if size is not None and actual != size:
        problems.append(f"size: expected {size} bytes, got {actual}")
    if sha256 is not None and got != sha256.lower():
        problems.append(f"sha256: expected {sha256.lower()}, got {got}")
    if problems:
        part.unlink()
        raise VerificationError(f"download of {url} failed verification ({'; '.join(problems)}); "
                                f"deleted {part}")
