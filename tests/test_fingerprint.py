"""lxmert_pl.fingerprint: the record of what made a result, the cached sha256 of weights, and what changed."""

from __future__ import annotations

import json
import os

from helpers_features import write_synthetic_tsv

from lxmert_pl import fingerprint as fp


def test_weights_hash_is_cached_by_path_size_mtime_and_inode(tmp_path, monkeypatch):
    monkeypatch.setenv("LXMERT_PL_HASH_CACHE", str(tmp_path / "cache" / "sha256.json"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 1000)
    real = fp.file_sha256(weights)
    cache = json.loads((tmp_path / "cache" / "sha256.json").read_text())
    assert cache[str(weights.resolve())]["sha256"] == real
    cache[str(weights.resolve())]["sha256"] = "from the cache"  # proves the next call does not read the file
    (tmp_path / "cache" / "sha256.json").write_text(json.dumps(cache))
    assert fp.file_sha256(weights) == "from the cache"
    stat = weights.stat()
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"b" * 1000)  # same size, same mtime, another inode: replaced at the same path
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, weights)
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert fp.file_sha256(weights) not in (real, "from the cache")
    monkeypatch.setenv("LXMERT_PL_HASH_CACHE", str(tmp_path / "file" / "under" / "a" / "file"))
    (tmp_path / "file").write_text("not a folder")
    assert fp.file_sha256(weights) == fp.file_sha256(weights)  # an unwritable cache is only slower


def test_records_compare_by_content_not_by_path(tmp_path, monkeypatch):
    monkeypatch.setenv("LXMERT_PL_HASH_CACHE", str(tmp_path / "sha256.json"))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.pth").write_bytes(b"weights")
        (tmp_path / name / "README.md").write_text(f"a model card {name}")  # not part of the weights
        write_synthetic_tsv(tmp_path / name / "f.tsv", ["1", "2"], num_boxes=[3, 4], dim=8, seed=0)
        os.utime(tmp_path / name / "f.tsv", ns=(1, 10**18))
    first = fp.fingerprint(tmp_path / "a", [tmp_path / "a" / "f.tsv"], {"k": 5})
    second = fp.fingerprint(tmp_path / "b", [tmp_path / "b" / "f.tsv"], {"k": 5})
    assert fp.compare(first, second) == []  # the same content elsewhere
    json.dumps(first)  # plain JSON
    write_synthetic_tsv(tmp_path / "c.tsv", ["1", "2"], num_boxes=[3, 4], dim=8, seed=1)
    (tmp_path / "b" / "w.pth").write_bytes(b"other!!")
    third = fp.fingerprint(tmp_path / "b", [tmp_path / "c.tsv", tmp_path / "a" / "f.tsv"], {"k": 6, "mode": "itm"})
    changes = fp.compare(first, third)
    assert changes[0].startswith("weights.files.w.pth: ")
    assert " -> " in changes[0]
    assert "features: 1 -> 2 entries" in changes and "settings.k: 5 -> 6" in changes
    assert "settings.mode: null -> itm" in changes
    fourth = fp.fingerprint(tmp_path / "b", [tmp_path / "c.tsv"], {"k": 5})
    assert [c.split(":")[0] for c in fp.compare(second, fourth)] == ["weights.files.w.pth", "features[0].mtime_ns"]
    assert fp.compare(None, first) and fp.compare({"old": "settings"}, first)
    from lxmert_pl.features import open_feature_source  # opened sources are fingerprinted by their files

    write_synthetic_tsv(tmp_path / "d.tsv", ["3"], num_boxes=[2], dim=8, seed=2)
    opened = open_feature_source([tmp_path / "a" / "f.tsv", tmp_path / "d.tsv"])
    assert fp.compare(fp.fingerprint(None, [opened], {}),
                      fp.fingerprint(None, [tmp_path / "a" / "f.tsv", tmp_path / "d.tsv"], {})) == []
