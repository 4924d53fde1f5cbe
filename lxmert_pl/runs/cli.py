"""One command-line vocabulary for every entry point: parse -> reject unknown flags -> compose -> run.

Each entry point (`eval.py`, `train.py`, `extract.py`, `python -m lxmert_pl.*`) declares its options as `Flag`s that
set config keys, in a `Command` with its base config, and runs through it:

    COMMAND = Command("eval.py", __doc__, "eval", [CKPT, NAME, OUT, Flag("--pairs", "data.pairs", "pairs"), ...])
    sys.exit(COMMAND.main(run_eval, argv))

Everything after the options is `key=value` config overrides. An unknown option, a malformed override, an unknown
config key, or a flag and an override that set the same key to different values is a one-line error (exit 2). The
run itself goes through `user_errors`: a user error is one line, a bug keeps its traceback. The same flag spellings
mean the same thing everywhere (`--accelerator cpu|gpu|auto`, `--devices N`, `--precision`, `--batch-size N`, ...).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lxmert_pl.errors import ConfigError
from lxmert_pl.runs.config import available, compose
from lxmert_pl.runs.errors import user_errors


@dataclass(frozen=True)
class Flag:
    """A command-line option.

    Args:
        option: the spelling, e.g. "--batch-size".
        key: the dotted config key it sets (e.g. "data.batch_size"); None for options the entry point reads itself
            (`--test`, `--experiment`).
        help: one line for `--help`.
        kind: "value" (one value), "list" (repeatable, appended), "switch" (no value; sets `value_if_set`).
        type: converts the text (int, float, str).
        choices: the allowed values, if limited.
        value_if_set: for switches, the value stored under `key` when the switch is given.
    """

    option: str
    key: str | None
    help: str
    kind: str = "value"
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    value_if_set: Any = True

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


# ---- the shared spellings ---------------------------------------------------------------------------------------
CKPT = Flag("--ckpt", "ckpt", "weights: an alias of checkpoints/registry.yaml or a path, any known format")
NAME = Flag("--name", "name", "run name (output folder outputs/NAME)")
OUT = Flag("--out", "out", "output folder (default outputs/<name>)")
MODEL_CONFIG = Flag("--model-config", "model_config", "architecture JSON (HF LxmertConfig field names)")
BATCH_SIZE = Flag("--batch-size", "data.batch_size", "pairs per forward pass", type=positive_int)
FEATURES = Flag("--features", "data.features", "obj36 TSV (or glob, or binary store); repeat for several", "list")
ACCELERATOR = Flag("--accelerator", "trainer.accelerator", "where to run", choices=("cpu", "gpu", "auto"))
DEVICES = Flag("--devices", "trainer.devices", "devices per node (N > 1: DDP, one process each)", type=positive_int)
NUM_NODES = Flag("--num-nodes", "trainer.num_nodes", "machines (DDP across nodes: torchrun / SLURM)",
                 type=positive_int)
PRECISION = Flag("--precision", "trainer.precision", "32-true | bf16-true | bf16-mixed | 16-mixed (fp32/bf16 short)")
TRAINER_FLAGS = (ACCELERATOR, DEVICES, NUM_NODES, PRECISION)

PRECISION_ALIASES = {"fp32": "32-true", "32": "32-true", "bf16": "bf16-true", "fp16": "16-mixed"}


class HelpConfig(argparse.Action):
    """`--help-config`: every config key of the entry point with its default, what it allows and its help."""

    def __init__(self, option_strings, dest, config: str = "", **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.config = config

    def __call__(self, parser, namespace, values, option_string=None):
        from lxmert_pl.runs.config import load_base
        from lxmert_pl.runs.schema import help_lines

        print(f"Config keys of {parser.prog} (configs/{self.config}.yaml; set any as key=value):")
        print("\n".join(help_lines(self.config, load_base(self.config))))
        parser.exit(0)


def build_parser(program: str, doc: str, flags: Sequence[Flag], groups: dict[str, str],
                 config: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        epilog="Any config key can be set after the options as key=value (e.g. data.batch_size=64); "
               "--help-config lists them.",
    )
    if config is not None:
        parser.add_argument("--help-config", action=HelpConfig, config=config,
                            help="list every config key with its default, allowed values and help, then exit")
    for option, group in groups.items():
        parser.add_argument(option, help=f"preset of configs/{group}/ ({', '.join(available(group))})")
    for flag in flags:
        if flag.kind == "switch":
            parser.add_argument(flag.option, dest=flag.dest, action="store_true", help=flag.help)
        else:
            parser.add_argument(flag.option, dest=flag.dest, help=flag.help, type=flag.type, choices=flag.choices,
                                action="append" if flag.kind == "list" else "store")
    return parser


def flag_values(flags: Sequence[Flag], namespace: argparse.Namespace) -> dict[str, Any]:
    """{config key: value} for the flags given on the command line (absent ones left out)."""
    values: dict[str, Any] = {}
    for flag in flags:
        given = getattr(namespace, flag.dest)
        if flag.key is None or given is None or given is False:
            continue
        values[flag.key] = flag.value_if_set if flag.kind == "switch" else given
    if "trainer.precision" in values:
        values["trainer.precision"] = PRECISION_ALIASES.get(values["trainer.precision"], values["trainer.precision"])
    return values


def check_agreement(values: dict[str, Any], overrides: Sequence[str], flags: Sequence[Flag]) -> None:
    """A flag and a key=value override for the same key must not disagree (which one would win is a guess)."""
    cli = OmegaConf.from_dotlist(list(overrides))
    by_key = {flag.key: flag.option for flag in flags if flag.key}
    for key, value in values.items():
        override = OmegaConf.select(cli, key, default=None)
        if override is None:
            continue
        if isinstance(override, DictConfig):
            continue
        plain = OmegaConf.to_container(override) if not isinstance(override, (str, int, float, bool)) else override
        if plain != value and str(plain) != str(value):
            raise ConfigError(f"{by_key[key]} {value} and {key}={plain} disagree: give the setting once")


def parse_command_line(
    program: str, doc: str, flags: Sequence[Flag], argv: Sequence[str], groups: dict[str, str] | None = None,
    config: str | None = None,
) -> tuple[argparse.Namespace, dict[str, Any], list[str]]:
    """(namespace, {config key: flag value}, key=value overrides). Exits 2 on an unknown option."""
    groups = groups or {}
    parser = build_parser(program, doc, flags, groups, config)
    namespace, rest = parser.parse_known_args(list(argv))
    unknown = [item for item in rest if item.startswith("-")]
    if unknown:
        valid = sorted({*groups, *(flag.option for flag in flags), "--help", *(["--help-config"] if config else [])})
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (valid options: {', '.join(valid)})")
    bad = [item for item in rest if "=" not in item]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are key=value)")
    values = flag_values(flags, namespace)
    return namespace, values, rest


@dataclass(frozen=True)
class Command:
    """An entry point's command line: its name, help text, base config, options and presets.

    Args:
        program: the name in messages ("eval.py").
        doc: the `--help` description (the entry point's docstring).
        config: the base config's name in configs/.
        flags: the options (see `Flag`).
        groups: preset options, e.g. {"--test": "test", "--experiment": "experiment"} (configs/<group>/NAME.yaml).
        adjust: optional hook that derives further config values from the parsed options (e.g. `--boxes N`).
    """

    program: str
    doc: str
    config: str
    flags: Sequence[Flag]
    groups: dict[str, str] | None = None
    adjust: Callable[[argparse.Namespace, dict[str, Any]], None] | None = None

    def compose(self, argv: Sequence[str]) -> DictConfig:
        """The run's config from a command line (raises ConfigError; exits 2 on an unknown option)."""
        groups = self.groups or {}
        namespace, values, overrides = parse_command_line(self.program, self.doc, self.flags, argv, groups,
                                                          self.config)
        check_agreement(values, overrides, self.flags)
        if self.adjust is not None:
            self.adjust(namespace, values)
        presets = {group: getattr(namespace, option.lstrip("-").replace("-", "_")) for option, group in groups.items()}
        return compose(self.config, flags=values, overrides=overrides, **presets)

    def main(self, run: Callable[[DictConfig], Any], argv: Sequence[str] | None = None) -> int:
        """Compose the config from `argv` (default: sys.argv) and `run(cfg)` under `user_errors`; returns 0."""
        with user_errors(self.program):
            run(self.compose(sys.argv[1:] if argv is None else list(argv)))
        return 0
