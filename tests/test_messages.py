"""Issue 25, item 5: each poor message of the hostile-user pass is one clear line (or a counted, named repair)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, load_script
from e2e_helpers import save_tiny_snapshot, write_pairs
from helpers_features import write_synthetic_tsv
from lxmert_pl.errors import CheckpointError, UserInputError
from lxmert_pl.export.model_card import check_card
from lxmert_pl.model.loading import load_lxmert
from lxmert_pl.pairs.io import PairFileError, read_captions
from lxmert_pl.registry import CheckpointUnavailableError, resolve_checkpoint
from lxmert_pl.retrieval import BlockScores


@pytest.mark.parametrize("name, content, said", [
    ("features.tsv", b"COCO_1\t480\t640\t36\tAAAA\tBBBB\n", "a tab-separated text file (a feature TSV?)"),
    ("config.json", b'{"hidden_size": 768}', "a JSON file"),
    ("photo.pth", b"\x89PNG\r\n\x1a\n" + bytes(64), "a PNG image"),
    ("notes.ckpt", b"these are my notes\n", "a text file (it starts 'these are my notes')"),
])
def test_a_file_that_is_not_a_checkpoint_says_what_it_looks_like(tmp_path, name, content, said):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="looks like") as err:
        load_lxmert(path)  # sniffed before anything is unpickled: no "needs arbitrary code execution", no IndexError
    assert f"{path}: this looks like {said}, not a checkpoint" in str(err.value)


def test_a_missing_local_folder_is_named_before_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointUnavailableError) as err:
        resolve_checkpoint("runs/best", download=False)
    assert str(err.value).startswith(f"no local folder or file 'runs/best' (from {tmp_path}); tried the Hub: ")


def test_the_hub_probe_answers_at_once_when_the_host_cannot_be_resolved(monkeypatch):
    from lxmert_pl.hub import hub_unreachable

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert "no-such-host.invalid" in hub_unreachable("https://no-such-host.invalid", timeout=2)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # through a proxy the Hub's own client decides
    assert hub_unreachable("https://no-such-host.invalid") is None


def test_a_model_config_typo_is_an_error_listing_the_valid_keys(tmp_path):
    ckpt = tmp_path / "model_LXRT.pth"
    model = save_tiny_snapshot(ckpt)
    sizes = model.config.to_dict()
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({**{k: v for k, v in sizes.items() if k != "hidden_size"},
                                "hiden_size": sizes["hidden_size"], "model_type": "lxmert"}))
    with pytest.raises(UserInputError, match=r"unknown model config key 'hiden_size' \(did you mean 'hidden_size'\?\)"
                                             r"; valid keys: .*hidden_size"):
        load_lxmert(ckpt, model_config=typo)
    foreign = tmp_path / "foreign.json"  # keys of another library that are no near miss: still ignored
    foreign.write_text(json.dumps({**sizes, "gradient_checkpointing": False, "model_type": "lxmert"}))
    assert load_lxmert(ckpt, model_config=foreign)[0].config == model.config


def test_card_is_checked_before_the_run(tmp_path, capsys):
    latin1 = tmp_path / "README.md"
    latin1.write_bytes("# Modèle\n".encode("latin-1"))
    with pytest.raises(UserInputError, match="not UTF-8 text .*a Latin-1 file"):
        check_card(latin1)
    with pytest.raises(FileNotFoundError, match="folder does not exist"):
        check_card(tmp_path / "no" / "README.md")
    (tmp_path / "new").mkdir()
    assert check_card(tmp_path / "new") == tmp_path / "new" / "README.md"  # a folder means its README.md
    # eval.py --card with pairs without labels: refused up front (there would be no metrics), nothing written
    pairs = tmp_path / "unlabelled.json"
    write_pairs(pairs, ["a", "b"], 4, labelled=False)
    (tmp_path / "card.md").write_text("# card\n")
    eval_py = load_script(REPO_ROOT / "eval.py", "eval_messages")
    with pytest.raises(SystemExit) as stop:
        eval_py.main(["--pairs", str(pairs), "--features", str(tmp_path / "x.tsv"), "--out", str(tmp_path / "out"),
                      "--card", str(tmp_path / "card.md")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "has no labels, so this run gives predictions only" in err, err
    assert not (tmp_path / "out").exists() and (tmp_path / "card.md").read_text() == "# card\n"


def test_retrieval_names_images_from_the_test_preset():
    from lxmert_pl.runs.retrieval import _preset_note

    eval_py = load_script(REPO_ROOT / "eval.py", "eval_messages")
    preset = eval_py.COMMAND.compose(["--task", "retrieval", "--captions", "caps.json"])
    note = _preset_note(preset, f"images: {preset.data.images} (features extracted by the detector)")
    assert "from configs/test/demo_val.yaml (--test demo_val): pass --features or --images" in note
    own = eval_py.COMMAND.compose(["--task", "retrieval", "--captions", "caps.json", "--features", "mine.tsv"])
    assert _preset_note(own, "features: mine.tsv") == ""


def test_a_karpathy_file_listing_an_image_twice_is_an_error_naming_it(tmp_path):
    images = [{"filename": f"{name}.jpg", "split": "test", "sentences": [{"raw": f"a caption of {name}"}]}
              for name in ("10", "11", "10")]
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images}))
    with pytest.raises(PairFileError, match=r"1 images appear in more than one entry: 10 \(images\[0\] and images\[2\]\)"):
        read_captions(path, split="test")


def test_a_damaged_block_file_is_named_and_scored_again(tmp_path, capsys):
    from lxmert_pl.runs.retrieval import ShardStore

    store = ShardStore(tmp_path / "shards")
    store.dir.mkdir()
    for block in range(3):
        store.write_block(BlockScores(block, np.arange(4), np.arange(4), np.ones(4, dtype=np.float32)))
    damaged = store.block_path(1)
    damaged.write_bytes(damaged.read_bytes()[:50])  # what a full disk or an edit leaves
    assert store.done(3) == {0, 2}
    assert f"{damaged}: damaged (" in capsys.readouterr().out and not damaged.exists()


def test_features_repair_honours_the_writer_lock(tmp_path, capsys):
    from lxmert_pl.features.__main__ import main

    tsv = tmp_path / "f.tsv"
    write_synthetic_tsv(tsv, ["1", "2"], num_boxes=2, dim=8)
    with open(tsv, "ab") as handle:
        handle.write(b"3\t480\t640")  # a partial last line, as a writer mid-row leaves it
    before = tsv.read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lxmert_pl.features.locking import WriteLock; "
                               "lock = WriteLock(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(tsv)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["repair", str(tsv)]) == 2
        assert "is being written by another process" in capsys.readouterr().err
        assert tsv.read_bytes() == before  # the writer's row is not cut
    finally:
        holder.kill()
        holder.wait()
    assert main(["repair", str(tsv)]) == 0 and len(tsv.read_bytes()) < len(before)
