"""The shared command line (lxmert_pl/runs/cli.py) and the user-error boundary (lxmert_pl/runs/errors.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lxmert_pl.errors import ConfigError, UserInputError
from lxmert_pl.registry import ResolvedCheckpoint
from lxmert_pl.runs.errors import user_errors

from conftest import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]


def entry_point(name: str):
    return load_script(REPO_ROOT / f"{name}.py", f"entry_{name}")


@pytest.fixture(scope="module")
def eval_cli():
    return entry_point("eval")


def test_user_errors_are_one_line_bugs_keep_their_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info, user_errors("prog"):
        raise UserInputError("bad value in f.json line 3")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "prog: error: bad value in f.json line 3\n"
    with pytest.raises(SystemExit), user_errors("prog"):
        raise IsADirectoryError(21, "Is a directory", "some/dir")
    assert capsys.readouterr().err == "prog: error: Is a directory: some/dir\n"
    with pytest.raises(SystemExit), user_errors("prog"):
        raise OSError(28, "No space left on device", "out/predictions.json")
    assert capsys.readouterr().err == "prog: error: No space left on device: out/predictions.json\n"
    # A KeyError / IndexError / plain ValueError from a bug is NOT turned into a "user error".
    for bug in (KeyError("x"), IndexError("list index out of range"), ValueError("internal")):
        with pytest.raises(type(bug)), user_errors("prog"):
            raise bug


def test_flag_and_override_for_the_same_key_must_agree(eval_cli):
    with pytest.raises(ConfigError, match="--batch-size 4 and data.batch_size=8 disagree"):
        eval_cli.COMMAND.compose(["--batch-size", "4", "data.batch_size=8"])
    cfg = eval_cli.COMMAND.compose(["--batch-size", "4", "data.batch_size=4"])
    assert cfg.data.batch_size == 4


def test_unknown_option_lists_the_valid_ones(eval_cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.COMMAND.compose(["--batchsize", "4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--batchsize" in err and "--batch-size" in err


def test_boxes_means_box_counts_and_given_boxes_a_file_in_eval_and_extract(eval_cli):
    extract_cli = entry_point("extract")
    for cli, base in ((eval_cli, []), (extract_cli, ["--images", "d", "--out", "o", "--detector", "x"])):
        cfg = cli.COMMAND.compose([*base, "--boxes", "10", "--given-boxes", "b.json"])
        assert (cfg.detector.min_boxes, cfg.detector.max_boxes) == (10, 10)
        given = cfg.data.given_boxes if "data" in cfg else cfg.given_boxes
        assert given == "b.json"


def test_threshold_must_be_finite(eval_cli, capsys):
    with pytest.raises(SystemExit):
        eval_cli.COMMAND.compose(["--threshold", "nan"])
    assert "finite" in capsys.readouterr().err


def test_shared_config_blocks_are_one_definition(eval_cli):
    """trainer/logger/detector blocks come from configs/shared: eval and train see the same keys."""
    train_cli = entry_point("train")
    eval_cfg = eval_cli.COMMAND.compose([])
    train_cfg = train_cli.COMMAND.compose([])
    assert eval_cfg.logger == train_cfg.logger
    for key in ("accelerator", "devices", "num_nodes"):
        assert eval_cfg.trainer[key] == train_cfg.trainer[key]
    assert (REPO_ROOT / "configs" / "shared" / "trainer.yaml").exists()


def test_precision_short_names(eval_cli):
    assert eval_cli.COMMAND.compose(["--precision", "bf16"]).trainer.precision == "bf16-true"


def test_demo_is_decided_by_the_registry_alias_not_the_path():
    assert ResolvedCheckpoint(Path("checkpoints/demo/lxrt_demo.ckpt"), alias="demo-lxrt").is_bundled_demo
    assert not ResolvedCheckpoint(Path("/home/me/demo_runs/best.ckpt")).is_bundled_demo
    assert not ResolvedCheckpoint(Path("x/demo.pth"), alias="lxr955").is_bundled_demo


def test_entry_points_do_not_import_lightning_before_parsing():
    """--help and option errors answer at once: the run modules are imported only to run."""
    code = ("import sys, runpy; sys.argv=['eval.py','--help'];\n"
            "try: runpy.run_path('eval.py', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "assert 'pytorch_lightning' not in sys.modules, 'lightning imported for --help'")
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
