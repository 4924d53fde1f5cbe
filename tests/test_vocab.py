"""Label vocabularies (lxmert_pl/vocab.py): a detector's own names win, VG's 1600/400 when found, fallback labels."""

from __future__ import annotations

import logging

import pytest
import yaml

from lxmert_pl import vocab
from lxmert_pl.registry import load_registry
from lxmert_pl.vocab import ATTRIBUTES_FILE, OBJECTS_FILE, Vocabulary, load_vocabulary, visual_genome_vocabulary


@pytest.fixture
def no_vg(monkeypatch, tmp_path):
    """No VG files anywhere, no download: the loader must fall back."""
    monkeypatch.setattr(vocab, "vg_search_dirs", lambda: [tmp_path / "nowhere"])
    monkeypatch.setattr(vocab, "_noted_fallback", False)
    monkeypatch.delenv(vocab.ENV_NO_VOCAB_DOWNLOAD, raising=False)  # conftest turns the download off elsewhere


def _write_vg(folder, objects=("yolk", "stop sign,stopsign", "person"), attributes=("gray,grey", "red")):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OBJECTS_FILE).write_text("\n".join(objects) + "\n", encoding="utf-8")
    (folder / ATTRIBUTES_FILE).write_text("\n".join(attributes), encoding="utf-8")  # VG's files end without \n
    return folder


def test_label_formats_and_fallback_names():
    v = Vocabulary(["circle", "stop sign,stopsign"], ["red"], "test")
    assert v.label(0, 0, 0.934) == "red circle 0.93"
    assert v.label(1) == "stop sign"
    assert v.label(0, None, 0.5) == "circle 0.50"
    assert v.object_name(123) == "class 123" and v.attribute_name(45) == "attr 45"
    assert v.object_name(-1) == "class -1"
    assert Vocabulary().label(7, 3, 1.0) == "attr 3 class 7 1.00"


def test_vg_files_from_env_folder_show_first_synonym(monkeypatch, tmp_path):
    monkeypatch.setenv(vocab.ENV_VG_VOCAB, str(_write_vg(tmp_path / "vg")))
    v = load_vocabulary(download=False)
    assert v.source == str(tmp_path / "vg")
    assert v.objects == ["yolk", "stop sign,stopsign", "person"] and v.attributes == ["gray,grey", "red"]
    assert v.label(1, 0, 0.9) == "gray stop sign 0.90"


def test_detector_vocabulary_wins_over_vg(monkeypatch, tmp_path):
    monkeypatch.setenv(vocab.ENV_VG_VOCAB, str(_write_vg(tmp_path / "vg")))
    inline = {"MODEL": {}, "LXMERT_PL": {"OBJECTS": ["circle", "square"], "ATTRIBUTES": ["red", "blue"]}}
    v = load_vocabulary(detector_config=inline, download=False)
    assert v.label(1, 1) == "blue square" and v.source == "detector config"
    # A file named in the config, relative to the detector folder.
    det = tmp_path / "det"
    det.mkdir()
    (det / "shapes.txt").write_text("circle\nsquare\n", encoding="utf-8")
    (det / "config.yaml").write_text(yaml.safe_dump({"LXMERT_PL": {"OBJECTS": "shapes.txt"}}), encoding="utf-8")
    v = load_vocabulary(det, download=False)
    assert v.objects == ["circle", "square"] and v.attributes == [] and str(det) in v.source
    # Files beside the config, no mention in it.
    other = _write_vg(tmp_path / "det2", objects=("triangle",), attributes=("green",))
    (other / "config.yaml").write_text("MODEL: {}\n", encoding="utf-8")
    assert load_vocabulary(other, download=False).label(0, 0) == "green triangle"


def test_no_vocabulary_falls_back_with_one_note(no_vg, tmp_path, caplog):
    det = tmp_path / "det"
    det.mkdir()
    (det / "config.yaml").write_text("MODEL: {}\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lxmert_pl.vocab"):
        first = load_vocabulary(det, download=False)
        load_vocabulary(None, download=False)
    assert first.is_fallback and first.label(12, 4, 0.5) == "attr 4 class 12 0.50"
    notes = [r for r in caplog.records if "vocabulary" in r.getMessage()]
    assert len(notes) == 1 and vocab.ENV_VG_VOCAB in notes[0].getMessage()


def test_failed_download_falls_back(no_vg, monkeypatch, tmp_path):
    from lxmert_pl.registry import DownloadError

    calls = []

    def unavailable(*args, **kwargs):
        calls.append(args)
        raise DownloadError("cannot reach raw.githubusercontent.com")

    monkeypatch.setattr(vocab, "_download_failed", False)
    monkeypatch.setattr("lxmert_pl.registry.download_file", unavailable)
    assert load_vocabulary(download=True).is_fallback
    assert load_vocabulary(download=True).is_fallback
    assert len(calls) == 1  # tried once per process


def test_download_goes_to_the_checkpoints_folder(no_vg, monkeypatch, tmp_path):
    fetched = []

    def fake_download(url, dest, sha256=None, size=None, progress=True, timeout=30):
        fetched.append((url, sha256, timeout))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text("circle\nsquare\n" if dest.name == OBJECTS_FILE else "red\n", encoding="utf-8")

    monkeypatch.setenv("LXMERT_PL_CHECKPOINTS", str(tmp_path / "ckpts"))
    monkeypatch.setattr(vocab, "_download_failed", False)
    monkeypatch.setattr("lxmert_pl.registry.download_file", fake_download)
    v = load_vocabulary(download=True)
    assert v.label(1, 0) == "red square" and v.source == str(tmp_path / "ckpts" / vocab.VG_ALIAS)
    assert len(fetched) == 2 and all(sha and timeout <= 5 for _, sha, timeout in fetched)


def test_registry_entry_pins_vg_files():
    entry = load_registry()[vocab.VG_ALIAS]
    assert entry.format == "vocab"
    assert sorted(r.relpath for r in entry.downloads) == ["vg-1600-400/attributes_vocab.txt",
                                                          "vg-1600-400/objects_vocab.txt"]
    assert all(r.sha256 and r.size for r in entry.downloads)


def test_real_vg_vocabulary_counts_and_known_ids():
    """Against the real files where they are found (never downloaded by the tests)."""
    v = visual_genome_vocabulary(download=False)
    if v is None:
        pytest.skip(f"the VG vocabulary files are not here: set ${vocab.ENV_VG_VOCAB} or put them in "
                    f"{vocab.SHARED_VOCAB_DIR} (registry alias {vocab.VG_ALIAS})")
    assert (len(v.objects), len(v.attributes)) == vocab.VG_COUNTS
    assert v.object_name(0) == "yolk" and v.object_name(16) == "stop sign"
    assert v.object_name(50) == "man" and v.object_name(117) == "dog" and v.object_name(364) == "person"
    assert v.attribute_name(0) == "gray" and v.attribute_name(4) == "red" and v.attribute_name(7) == "white"
