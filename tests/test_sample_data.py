"""scripts/make_sample_data.py: deterministic synthetic scenes with true boxes, true captions and false negatives."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

import conftest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_sample_data.py"
COUNTS = {"train": 8, "val": 3, "test": 1}  # a one-image split has no other image to take a negative from
SPLITS = tuple(COUNTS)


def load_script() -> ModuleType:
    """Import the script as a module (registered in sys.modules, as its dataclasses need)."""
    return conftest.load_script(SCRIPT, "make_sample_data")


GEN = load_script()
MENTION_RE = re.compile(rf"\b(?:(small|large) )?({'|'.join(GEN.COLORS)}) ({'|'.join(GEN.SHAPES)})\b")


def run(out: Path, seed: int = 0) -> Path:
    argv = ["--out", str(out), "--seed", str(seed)] + [arg for s, n in COUNTS.items() for arg in (f"--{s}", str(n))]
    assert GEN.main(argv) == 0
    return out


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def mentions(sentence: str) -> list[tuple[str | None, str, str]]:
    """(size, colour, shape) of every object a caption names; fails when it names none."""
    found = [match.groups() for match in MENTION_RE.finditer(sentence)]
    assert found, f"caption names no object: {sentence!r}"
    return found


def is_true(sentence: str, objects: list[dict]) -> bool:
    """Every named object is present, with the named size when there is one."""
    return all(any(o["color"] == color and o["shape"] == shape and size in (None, o["size"]) for o in objects)
               for size, color, shape in mentions(sentence))


def is_false(sentence: str, objects: list[dict]) -> bool:
    """Some named colour+shape combination is absent, whatever the sizes."""
    present = {(o["color"], o["shape"]) for o in objects}
    return any((color, shape) not in present for _, color, shape in mentions(sentence))


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("sample"))


def test_layout(sample: Path) -> None:
    expected = {"boxes.json", "scenes.json"}
    expected |= {f"captions_{s}.json" for s in SPLITS} | {f"{s}_pairs.json" for s in SPLITS}
    assert expected <= {p.name for p in sample.iterdir()}
    boxes = read(sample / "boxes.json")
    for split, count in COUNTS.items():
        ids = [f"sample_{split}_{i:06d}" for i in range(count)]
        assert sorted(p.stem for p in (sample / "images" / split).glob("*.png")) == ids
        assert [record["img_id"] for record in read(sample / f"captions_{split}.json")] == ids
        assert all(img_id in boxes for img_id in ids)
    assert len(boxes) == sum(COUNTS.values())


def test_same_seed_same_files_other_seed_other_files(sample: Path, tmp_path: Path) -> None:
    assert file_bytes(run(tmp_path / "again")) == file_bytes(sample)
    assert file_bytes(run(tmp_path / "other", seed=1)) != file_bytes(sample)


def test_rerun_with_fewer_images_removes_stale_ones(tmp_path: Path) -> None:
    out = run(tmp_path / "out")
    GEN.main(["--out", str(out), "--train", "2", "--val", "0", "--test", "0"])
    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == [
        "sample_train_000000.png", "sample_train_000001.png"]
    assert not list((out / "images" / "val").iterdir())


def test_boxes_are_tight_and_inside_the_image(sample: Path) -> None:
    boxes, scenes = read(sample / "boxes.json"), read(sample / "scenes.json")
    for img_id, scene in scenes.items():
        pixels = np.asarray(Image.open(sample / "images" / scene["split"] / f"{img_id}.png").convert("RGB"))
        assert pixels.shape == (scene["height"], scene["width"], 3)
        assert 128 <= scene["width"] <= 200 and 128 <= scene["height"] <= 160
        assert 1 <= len(scene["objects"]) <= 3
        assert boxes[img_id] == [o["box"] for o in scene["objects"]]
        for obj in scene["objects"]:
            x1, y1, x2, y2 = obj["box"]
            assert 0 <= x1 < x2 <= scene["width"] and 0 <= y1 < y2 <= scene["height"]
            # tight: the object's colour touches all four sides of its box, and a 2-pixel ring around the box
            # (closer than any other shape) holds none of it
            is_color = (pixels == GEN.COLORS[obj["color"]]).all(axis=-1)
            inside = is_color[y1:y2, x1:x2]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            assert is_color[max(y1 - 2, 0):y2 + 2, max(x1 - 2, 0):x2 + 2].sum() == inside.sum()


def test_captions_name_only_present_objects(sample: Path) -> None:
    scenes = read(sample / "scenes.json")
    for split in SPLITS:
        for record in read(sample / f"captions_{split}.json"):
            objects = scenes[record["img_id"]]["objects"]
            captions = record["sentf"]["mscoco"]
            assert captions and len(set(captions)) == len(captions)
            assert all(is_true(caption, objects) for caption in captions)
            named = {(color, shape) for _, color, shape in mentions(captions[0])}
            assert named == {(o["color"], o["shape"]) for o in objects}  # the first caption names everything


def test_pairs_are_balanced_and_labelled_correctly(sample: Path) -> None:
    scenes = read(sample / "scenes.json")
    all_ids = []
    for split, count in COUNTS.items():
        pairs = read(sample / f"{split}_pairs.json")
        all_ids += [pair["question_id"] for pair in pairs]
        assert Counter(pair["ground"] for pair in pairs) == {"True": count, "False": count}
        assert Counter(pair["img_id"] for pair in pairs) == {f"sample_{split}_{i:06d}": 2 for i in range(count)}
        captions = {record["img_id"]: record["sentf"]["mscoco"] for record in read(sample / f"captions_{split}.json")}
        for pair in pairs:
            assert set(pair) == {"question_id", "img_id", "sent", "ground", "label"}
            assert isinstance(pair["question_id"], int)
            objects = scenes[pair["img_id"]]["objects"]
            if pair["ground"] == "True":
                assert pair["label"] == {"yes": 1} and pair["sent"] in captions[pair["img_id"]]
                assert is_true(pair["sent"], objects)
            else:
                assert pair["label"] == {"no": 1} and is_false(pair["sent"], objects)
    assert len(set(all_ids)) == len(all_ids)


def test_negatives_come_from_other_images_when_possible(sample: Path) -> None:
    captions = {record["img_id"]: record["sentf"]["mscoco"] for record in read(sample / "captions_train.json")}
    for pair in read(sample / "train_pairs.json"):
        if pair["ground"] == "False":
            assert any(pair["sent"] in sents for img_id, sents in captions.items() if img_id != pair["img_id"])


def test_negative_picker_skips_captions_true_for_the_image() -> None:
    rng = np.random.default_rng(0)
    red, blue = (GEN.SceneObject(color, shape, "small", (0, 0, 9, 9)) for color, shape in (("red", "circle"),
                                                                                          ("blue", "square")))
    red_caption = GEN.describe(rng, [red])
    both_caption = GEN.describe(rng, [red, blue])
    scenes = [GEN.Scene("a", None, [red], [red_caption]),
              GEN.Scene("b", None, [red, blue], [red_caption, both_caption])]
    for seed in range(10):
        assert GEN.pick_negative(np.random.default_rng(seed), scenes, 0) is both_caption
        made_up = GEN.pick_negative(np.random.default_rng(seed), scenes, 1)  # every other caption is true for "b"
        assert is_false(made_up.text, [{"color": o.color, "shape": o.shape} for o in (red, blue)])
