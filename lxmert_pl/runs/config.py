"""Compose a run's configuration: shared blocks + base YAML + experiment preset + test split + CLI flags + overrides.

A base config may start with `defaults: [trainer, logger, ...]`: each named block is read from
`configs/shared/<name>.yaml` and put under the key `<name>`; the base file's own keys extend or override it.

Configs are plain OmegaConf YAML under `configs/`. Unknown keys are an error listing the valid ones. Relative
paths inside `configs/test/*.yaml` are relative to the repository root; paths given on the command line are
relative to the current directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from lxmert_pl.errors import ConfigError  # noqa: F401  (re-exported)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
PATH_KEYS = ("pairs", "images", "given_boxes", "features", "train", "val", "captions")




def valid_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        keys += valid_keys(value, name + ".") if isinstance(value, DictConfig) else [name]
    return keys


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def load_group(group: str, name: str) -> DictConfig:
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown {group} config {name!r} (no {path}); available: {', '.join(available(group))}")
    return OmegaConf.load(path)


def _absolute_paths(cfg: DictConfig, root: Path) -> DictConfig:
    """Make the relative file paths of a bundled config absolute (relative to `root`)."""
    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str(root / value)
        return value

    for key in PATH_KEYS:
        if key in cfg and cfg[key] is not None:
            value = cfg[key]
            cfg[key] = [fix(v) for v in value] if isinstance(value, (list, ListConfig)) else fix(value)
    return cfg


def load_base(base: str) -> DictConfig:
    """configs/<base>.yaml with the shared blocks its `defaults` list names (configs/shared/<name>.yaml)."""
    path = CONFIG_DIR / f"{base}.yaml"
    cfg = OmegaConf.load(path)
    shared = {}
    for name in cfg.pop("defaults", None) or []:
        block = CONFIG_DIR / "shared" / f"{name}.yaml"
        if not block.exists():
            raise ConfigError(f"{path}: defaults names {name!r}, but {block} does not exist")
        shared[name] = OmegaConf.load(block)
    return OmegaConf.merge(OmegaConf.create(shared), cfg)


def merge_strict(cfg: DictConfig, update: DictConfig | dict, where: str) -> DictConfig:
    OmegaConf.set_struct(cfg, True)
    try:
        return OmegaConf.merge(cfg, update)
    except (ConfigAttributeError, ConfigKeyError) as err:
        raise ConfigError(
            f"{where}: unknown config key ({err.full_key if hasattr(err, 'full_key') else err}); "
            f"valid keys: {', '.join(valid_keys(cfg))}"
        ) from None


def enabled_shorthand(cfg: DictConfig, override: str) -> str:
    """`block=false` / `block=true` for a block with an `enabled` key (e.g. `report=false`) -> `block.enabled=...`."""
    key, sep, value = override.partition("=")
    block = cfg.get(key) if sep and "." not in key else None
    if isinstance(block, DictConfig) and "enabled" in block and value.strip().lower() in ("true", "false"):
        return f"{key}.enabled={value.strip().lower()}"
    return override


def compose(
    base: str,
    *,
    experiment: str | None = None,
    test: str | None = None,
    flags: dict[str, Any] | None = None,
    overrides: Iterable[str] = (),
) -> DictConfig:
    """`base`: a file in configs/ (e.g. "eval"); `flags`: dotted keys set by CLI options (None values skipped)."""
    cfg = load_base(base)
    if experiment:
        cfg = merge_strict(cfg, load_group("experiment", experiment), f"configs/experiment/{experiment}.yaml")
    overrides = [enabled_shorthand(cfg, o) for o in overrides]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"unrecognised arguments {bad}: overrides are key=value; valid keys: "
                          f"{', '.join(valid_keys(cfg))}")
    cli = OmegaConf.from_dotlist(overrides)
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    for key, value in given.items():
        OmegaConf.update(cli, key, value, force_add=True)
    test_name = test or OmegaConf.select(cli, "test") or cfg.get("test")
    if OmegaConf.select(cli, "data.pairs"):
        test_name = None  # explicit pairs: no test split
    if "test" in cfg:
        cfg.test = test_name
    if test_name and "data" in cfg:
        split = _absolute_paths(load_group("test", test_name), REPO_ROOT)
        cfg = merge_strict(cfg, {"data": split}, f"configs/test/{test_name}.yaml")
    return merge_strict(cfg, cli, "command line")
