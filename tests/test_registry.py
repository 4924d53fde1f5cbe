"""Checkpoint registry and downloader, against a local HTTP server on 127.0.0.1 (no outside network)."""

from __future__ import annotations

import hashlib
import logging
import random
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from lxmert_pl.registry import (
    FORMATS,
    CheckpointUnavailableError,
    DownloadError,
    RegistryError,
    UnknownCheckpointError,
    VerificationError,
    download_file,
    load_registry,
    resolve_checkpoint,
)

PAYLOAD = random.Random(0).randbytes(300_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")


class FileServer(ThreadingHTTPServer):
    """Serves the files under `root`; records `(path, Range header)` of every request.

    With `cut_after` set, each response announces its full length but closes after that many body bytes.
    """

    def __init__(self, root: Path, honour_range: bool) -> None:
        super().__init__(("127.0.0.1", 0), FileHandler)
        self.root = root
        self.honour_range = honour_range
        self.cut_after: int | None = None
        self.requests: list[tuple[str, str | None]] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_port}/{name}"


class FileHandler(BaseHTTPRequestHandler):
    """GET of a file under the server root, with `Range: bytes=N-[M]` support unless the server ignores Range."""

    server: FileServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        range_header = self.headers.get("Range")
        self.server.requests.append((self.path, range_header))
        path = self.server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        match = RANGE_RE.fullmatch(range_header or "") if self.server.honour_range else None
        if match is None:
            self._reply(200, data, {})
            return
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) else len(data) - 1
        if start >= len(data):
            self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            return
        self._reply(206, data[start:end + 1], {"Content-Range": f"bytes {start}-{end}/{len(data)}"})

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[: self.server.cut_after])

    def log_message(self, format: str, *args: object) -> None:  # keep the test output quiet
        pass


@contextmanager
def serving(root: Path, honour_range: bool = True) -> Iterator[FileServer]:
    """Run a `FileServer` in a thread for the duration of the block."""
    root.mkdir(parents=True, exist_ok=True)
    server = FileServer(root, honour_range)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FileServer]:
    with serving(tmp_path / "served") as srv:
        yield srv


@pytest.fixture
def server_ignoring_range(tmp_path: Path) -> Iterator[FileServer]:
    with serving(tmp_path / "served", honour_range=False) as srv:
        yield srv


def closed_port_url(name: str) -> str:
    """A URL on 127.0.0.1 where nothing listens (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def write_registry(path: Path, entries: dict) -> Path:
    path.write_text(yaml.safe_dump(entries), encoding="utf-8")
    return path


def single_file_entry(url: str, sha256: str | None = None, size: int | None = None) -> dict:
    return {"file": "model.pth", "format": "lxrt-pretrain", "source": url, "sha256": sha256, "size": size,
            "description": "test snapshot"}


# ----------------------------------------------------------------------------------------------- download_file


def test_download_verifies_checksum_and_records_it(server: FileServer, tmp_path: Path) -> None:
    (server.root / "model.pth").write_bytes(PAYLOAD)
    dest = tmp_path / "out" / "model.pth"
    got = download_file(server.url("model.pth"), dest, sha256=PAYLOAD_SHA.upper(), size=len(PAYLOAD), progress=False)
    assert got == PAYLOAD_SHA
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "out" / "model.pth.part").exists()
    assert (tmp_path / "out" / "model.pth.sha256").read_text() == f"{PAYLOAD_SHA}  model.pth\n"
    assert server.requests == [("/model.pth", None)]


def test_download_without_checksum_reports_unverified(server: FileServer, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    (server.root / "model.pth").write_bytes(PAYLOAD)
    dest = tmp_path / "model.pth"
    with caplog.at_level(logging.WARNING, logger="lxmert_pl.registry"):
        download_file(server.url("model.pth"), dest, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert "could not verify" in caplog.text and PAYLOAD_SHA in caplog.text
    assert (tmp_path / "model.pth.sha256").read_text().split()[0] == PAYLOAD_SHA


def test_resume_partial_download_with_range(server: FileServer, tmp_path: Path) -> None:
    (server.root / "model.pth").write_bytes(PAYLOAD)
    dest = tmp_path / "model.pth"
    (tmp_path / "model.pth.part").write_bytes(PAYLOAD[:123_456])
    got = download_file(server.url("model.pth"), dest, sha256=PAYLOAD_SHA, progress=False)
    assert server.requests == [("/model.pth", "bytes=123456-")]
    assert got == PAYLOAD_SHA and dest.read_bytes() == PAYLOAD


def test_cut_off_transfer_keeps_part_and_resumes(server: FileServer, tmp_path: Path) -> None:
    (server.root / "model.pth").write_bytes(PAYLOAD)
    dest = tmp_path / "model.pth"
    server.cut_after = 100_000
    with pytest.raises(DownloadError, match="kept and resumed"):
        download_file(server.url("model.pth"), dest, sha256=PAYLOAD_SHA, progress=False)
    assert (tmp_path / "model.pth.part").stat().st_size == 100_000 and not dest.exists()
    server.cut_after = None
    download_file(server.url("model.pth"), dest, sha256=PAYLOAD_SHA, progress=False)
    assert server.requests == [("/model.pth", None), ("/model.pth", "bytes=100000-")]
    assert dest.read_bytes() == PAYLOAD


def test_restart_when_server_ignores_range(server_ignoring_range: FileServer, tmp_path: Path) -> None:
    (server_ignoring_range.root / "model.pth").write_bytes(PAYLOAD)
    dest = tmp_path / "model.pth"
    (tmp_path / "model.pth.part").write_bytes(b"stale bytes that must not survive")
    download_file(server_ignoring_range.url("model.pth"), dest, sha256=PAYLOAD_SHA, progress=False)
    assert server_ignoring_range.requests == [("/model.pth", "bytes=33-")]
    assert dest.read_bytes() == PAYLOAD


def test_restart_when_partial_file_is_too_long(server: FileServer, tmp_path: Path) -> None:
    (server.root / "model.pth").write_bytes(PAYLOAD)
    dest = tmp_path / "model.pth"
    (tmp_path / "model.pth.part").write_bytes(PAYLOAD + b"extra")
    download_file(server.url("model.pth"), dest, sha256=PAYLOAD_SHA, progress=False)
    assert server.requests == [("/model.pth", f"bytes={len(PAYLOAD) + 5}-"), ("/model.pth", None)]
    assert dest.read_bytes() == PAYLOAD


@pytest.mark.parametrize("size", [None, len(PAYLOAD)])
def test_corrupted_download_fails_and_leaves_nothing(server: FileServer, tmp_path: Path, size: int | None) -> None:
    altered = bytearray(PAYLOAD)
    altered[1000] ^= 0xFF
    (server.root / "model.pth").write_bytes(bytes(altered))
    dest = tmp_path / "model.pth"
    with pytest.raises(VerificationError) as info:
        download_file(server.url("model.pth"), dest, sha256=PAYLOAD_SHA, size=size, progress=False)
    assert f"expected {PAYLOAD_SHA}" in str(info.value)
    assert f"got {hashlib.sha256(altered).hexdigest()}" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]


def test_wrong_size_fails_verification(server: FileServer, tmp_path: Path) -> None:
    (server.root / "model.pth").write_bytes(PAYLOAD)
    with pytest.raises(VerificationError, match=f"expected {len(PAYLOAD) + 1} bytes, got {len(PAYLOAD)}"):
        download_file(server.url("model.pth"), tmp_path / "model.pth", size=len(PAYLOAD) + 1, progress=False)
    assert not (tmp_path / "model.pth").exists() and not (tmp_path / "model.pth.part").exists()


# ----------------------------------------------------------------------------------------------- resolve_checkpoint


def test_existing_path_is_passed_through(tmp_path: Path) -> None:
    weights = tmp_path / "anything.bin"
    weights.write_bytes(b"w")
    for given in (str(weights), tmp_path):
        resolved = resolve_checkpoint(given, registry=write_registry(tmp_path / "registry.yaml", {}))
        assert resolved.path == Path(given)
        assert (resolved.alias, resolved.format, resolved.description) == (None, None, None)


def test_unknown_alias_lists_the_aliases(tmp_path: Path) -> None:
    registry = write_registry(tmp_path / "registry.yaml", {
        "alpha": single_file_entry("http://127.0.0.1:9/a"),
        "beta": single_file_entry("http://127.0.0.1:9/b"),
    })
    with pytest.raises(UnknownCheckpointError, match="known aliases .*: alpha, beta$"):
        resolve_checkpoint("gamma", registry=registry, checkpoints_dir=tmp_path)


def test_alias_downloads_into_the_env_checkpoints_dir(server: FileServer, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (server.root / "model.pth").write_bytes(PAYLOAD)
    registry = write_registry(tmp_path / "registry.yaml",
                              {"snap": single_file_entry(server.url("model.pth"), PAYLOAD_SHA, len(PAYLOAD))})
    monkeypatch.setenv("LXMERT_PL_CHECKPOINTS", str(tmp_path / "ckpts"))
    resolved = resolve_checkpoint("snap", registry=registry, progress=False)
    assert resolved.path == tmp_path / "ckpts" / "model.pth"
    assert (resolved.alias, resolved.format, resolved.description) == ("snap", "lxrt-pretrain", "test snapshot")
    assert resolved.path.read_bytes() == PAYLOAD
    assert resolve_checkpoint("snap", registry=registry).path == resolved.path
    assert len(server.requests) == 1  # the second resolve found the file


@pytest.mark.parametrize("download", [True, False])
def test_offline_or_no_download_says_what_to_put_where(tmp_path: Path, download: bool) -> None:
    url = closed_port_url("model.pth")
    registry = write_registry(tmp_path / "registry.yaml", {"snap": single_file_entry(url)})
    ckpts = tmp_path / "ckpts"
    with pytest.raises(CheckpointUnavailableError) as info:
        resolve_checkpoint("snap", registry=registry, checkpoints_dir=ckpts, download=download, progress=False)
    message = str(info.value)
    assert f"put model.pth at {ckpts / 'model.pth'}\n    from {url}" in message
    assert ("download failed" if download else "download=False") in message


def test_hf_directory_entry_downloads_only_missing_files(server: FileServer, tmp_path: Path) -> None:
    files = {"config.json": b'{"hidden_size": 32}', "pytorch_model.bin": PAYLOAD}
    for name, data in files.items():
        (server.root / name).write_bytes(data)
    registry = write_registry(tmp_path / "registry.yaml", {"hf-model": {
        "file": "org/model", "format": "hf", "description": "HF dir",
        "source": [{"file": name, "url": server.url(name), "sha256": hashlib.sha256(data).hexdigest(),
                    "size": len(data)} for name, data in files.items()],
    }})
    ckpts = tmp_path / "ckpts"
    (ckpts / "org" / "model").mkdir(parents=True)
    (ckpts / "org" / "model" / "config.json").write_bytes(files["config.json"])
    resolved = resolve_checkpoint("hf-model", registry=registry, checkpoints_dir=ckpts, progress=False)
    assert resolved.path == ckpts / "org" / "model" and resolved.format == "hf"
    assert all((resolved.path / name).read_bytes() == data for name, data in files.items())
    assert server.requests == [("/pytorch_model.bin", None)]


def test_hf_directory_offline_lists_every_missing_file(tmp_path: Path) -> None:
    registry = write_registry(tmp_path / "registry.yaml", {"hf-model": {
        "file": "org/model", "format": "hf", "description": "HF dir",
        "source": [{"file": name, "url": closed_port_url(name)} for name in ("config.json", "pytorch_model.bin")],
    }})
    with pytest.raises(CheckpointUnavailableError) as info:
        resolve_checkpoint("hf-model", registry=registry, checkpoints_dir=tmp_path / "c", progress=False)
    for name in ("config.json", "pytorch_model.bin"):
        assert f"put {name} at {tmp_path / 'c' / 'org' / 'model' / name}" in str(info.value)


def test_bundled_entry_resolves_next_to_its_registry(tmp_path: Path) -> None:
    registry = write_registry(tmp_path / "registry.yaml", {"demo": {
        "file": "demo/tiny.ckpt", "format": "lightning", "source": "bundled", "description": "demo"}})
    with pytest.raises(CheckpointUnavailableError, match="ships with the repository"):
        resolve_checkpoint("demo", registry=registry, checkpoints_dir=tmp_path / "elsewhere")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "tiny.ckpt").write_bytes(b"ckpt")
    resolved = resolve_checkpoint("demo", registry=registry, checkpoints_dir=tmp_path / "elsewhere")
    assert resolved.path == tmp_path / "demo" / "tiny.ckpt" and resolved.format == "lightning"


@pytest.mark.parametrize("entry, problem", [
    ({"file": "x", "format": "onnx", "source": "http://h/x", "description": "d"}, "format 'onnx'"),
    ({"file": "x", "format": "hf", "source": "ftp://h/x", "description": "d"}, "http"),
    ({"file": "x", "format": "hf", "source": "http://h/x", "sha256": "abc", "description": "d"}, "64 hex"),
    ({"file": "x", "format": "hf", "source": None, "description": "d"}, "manual"),
    ({"file": "x", "format": "hf"}, "description"),
])
def test_malformed_registry_is_rejected(tmp_path: Path, entry: dict, problem: str) -> None:
    with pytest.raises(RegistryError, match=problem):
        load_registry(write_registry(tmp_path / "registry.yaml", {"bad": entry}))


def test_repository_registry() -> None:
    entries = load_registry()
    expected = {
        "lxr955": "lxrt-pretrain", "lxr955-epoch20": "lxrt-pretrain", "lxmert-base-uncased": "hf",
        "lxmert-vqa-uncased": "hf", "frcnn-vg-finetuned": "frcnn-hf", "demo-lxrt": "lightning",
        "demo-frcnn": "frcnn-hf",
    }
    assert {alias: entries[alias].format for alias in expected} == expected
    assert all(entry.format in FORMATS for entry in entries.values())
    assert entries["lxr955"].downloads[0].url == "https://nlp.cs.unc.edu/data/model_LXRT.pth"
    assert entries["frcnn-vg-finetuned"].hub.files == ("config.yaml", "pytorch_model.bin")  # tests/test_hub.py
    assert entries["demo-lxrt"].bundled_dir == entries["demo-frcnn"].bundled_dir is not None
