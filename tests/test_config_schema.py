"""The one config schema (lxmert_pl/runs/schema.py): every key of configs/ has an entry, and a bad value given either
as a flag or as key=value is one line naming the key, exit 2, before anything runs or is written."""

from __future__ import annotations

import typing

import pytest
from omegaconf import OmegaConf

from conftest import REPO_ROOT, load_script
from e2e_helpers import run_script
from lxmert_pl.runs.config import CONFIG_DIR, load_base, valid_keys
from lxmert_pl.runs.schema import SCHEMAS, entries

SCRIPTS = {"eval": "eval.py", "train": "train.py", "extract": "extract.py"}


def command(base: str):
    return load_script(REPO_ROOT / SCRIPTS[base], f"schema_test_{base}").COMMAND


def test_every_yaml_key_has_a_schema_entry_and_every_entry_a_yaml_default():
    bases = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))
    assert bases, CONFIG_DIR
    for base in bases:
        assert base in SCHEMAS, f"configs/{base}.yaml has no schema: add a dataclass to lxmert_pl/runs/schema.py"
        in_yaml, in_schema = set(valid_keys(load_base(base))), set(entries(SCHEMAS[base]))
        assert not in_yaml - in_schema, f"configs/{base}.yaml keys without a schema entry: {in_yaml - in_schema}"
        assert not in_schema - in_yaml, f"schema entries of {base} without a default in the YAML: {in_schema - in_yaml}"
    eval_keys = set(entries(SCHEMAS["eval"]))
    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        keys = set(valid_keys(OmegaConf.load(path)))
        assert keys <= eval_keys, f"{path}: keys without a schema entry: {keys - eval_keys}"
    for path in sorted((CONFIG_DIR / "test").glob("*.yaml")):
        keys = {f"data.{k}" for k in valid_keys(OmegaConf.load(path))}
        assert keys <= eval_keys, f"{path}: keys without a schema entry: {keys - eval_keys}"
    for path in sorted((CONFIG_DIR / "shared").glob("*.yaml")):
        users = [base for base in bases if path.stem in (OmegaConf.load(CONFIG_DIR / f"{base}.yaml").defaults or [])]
        assert users, f"{path} is used by no base config"


def wrong_value(schema: type, dotted: str) -> str:
    """A value of the wrong type for the key."""
    owner = schema
    for part in dotted.split(".")[:-1]:
        owner = typing.get_type_hints(owner)[part]
    kind = typing.get_type_hints(owner)[dotted.rsplit(".", 1)[-1]]
    if typing.get_origin(kind) is typing.Union:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if kind in (int, float, bool):
        return "abc"
    if kind is str:
        return "[1,2]"
    return "{a: 1}"  # a list key given a mapping


@pytest.mark.parametrize("base", sorted(SCRIPTS))
def test_every_key_set_to_a_wrong_type_is_one_line_and_exit_2(base, capsys):
    cmd = command(base)
    keys = list(entries(SCHEMAS[base]))
    assert len(keys) > 10
    for dotted in keys:
        value = wrong_value(SCHEMAS[base], dotted)
        with pytest.raises(SystemExit) as stop:
            cmd.main(lambda cfg: pytest.fail(f"{dotted}={value} was accepted"), [f"{dotted}={value}"])
        err = capsys.readouterr().err
        assert stop.value.code == 2, (dotted, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (dotted, err)
        assert dotted in err, (dotted, err)


# The values of issue 25, each refused in one line naming the key and what is allowed.
REFUSED = [
    ("eval", ["data.batch_size=0"], "data.batch_size=0: allowed is a whole number >= 1"),
    ("eval", ["trainer.precision=bogus"], "trainer.precision=bogus: allowed is one of 32-true"),
    ("eval", ["mode=bogus"], "mode=bogus: allowed is one of itm, cosine"),
    ("train", ["optim.lr=-1"], "optim.lr=-1.0: allowed is a number >= 0"),
    ("eval", ["retrieval.k=abc"], "retrieval.k=abc: allowed is null or a whole number >= 1"),
    ("eval", ["retrieval.k=true"], "retrieval.k=True: allowed is null or a whole number >= 1"),
    ("eval", ["retrieval.image_block=0"], "retrieval.image_block=0: allowed is a whole number >= 1"),
    ("extract", ["--min-boxes", "50", "--max-boxes", "10"], "detector.min_boxes (50) is larger than"),
    ("extract", ["detector.min_boxes=50", "detector.max_boxes=10"], "detector.min_boxes (50) is larger than"),
    ("eval", ["--threshold", "2"], "threshold=2.0 is outside [0, 1]"),
    ("eval", ["--mode", "cosine", "--threshold", "-1.5"], "threshold=-1.5 is outside [-1, 1]"),
    ("eval", ["data=5"], "data is a group of keys"),
    ("train", ["trainer.max_steps=0"], "trainer.max_steps=0"),
]


@pytest.mark.parametrize("base,argv,message", REFUSED, ids=[" ".join(a) for _, a, _ in REFUSED])
def test_the_values_of_the_issue_are_refused_by_name(base, argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        command(base).main(lambda cfg: pytest.fail("accepted"), argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_values_are_converted_to_the_schema_types():
    cfg = command("eval").compose(["retrieval.k=5", "data.features=a.tsv", "trainer.precision=bf16",
                                   "--mode", "cosine", "--threshold", "-0.5"])
    assert cfg.retrieval.k == 5 and list(cfg.data.features) == ["a.tsv"] and cfg.trainer.precision == "bf16-true"
    assert cfg.threshold == -0.5


def test_a_refused_value_writes_nothing_and_help_config_lists_the_keys(tmp_path):
    out = tmp_path / "run"
    done = run_script("eval.py", "--task", "retrieval", "--out", out, "retrieval.image_block=0")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == ("eval.py: error: retrieval.image_block=0: allowed is a whole number >= 1 "
                                   "(images per block (the unit of sharding and resume))")
    assert not out.exists()  # nothing recorded: the corrected rerun starts as a fresh run
    listing = run_script("train.py", "--help-config")
    assert listing.returncode == 0, listing.stderr
    assert "  optim.lr = 5e-05: a number >= 0 (AdamW peak learning rate)" in listing.stdout
    assert len(listing.stdout.splitlines()) == len(entries(SCHEMAS["train"])) + 1
