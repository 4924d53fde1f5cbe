"""The one schema of the configuration: every key of configs/ with its type, its allowed values and a line of help.

The YAML files in configs/ hold the defaults (read top to bottom, with their comments); this module says what each key
may hold. Both ways of setting a key (a flag such as `--batch-size 0` and `data.batch_size=0`) go through the same
check (`validate`), after the config is composed and before the run writes or records anything. A bad value is one
line naming the key, the value and what is allowed (a `ConfigError`, exit 2).

To add a config key: add it to the YAML with its default and comment, and add one line here in the block's dataclass,

    new_key: int = key("what it does", minimum=1)

(the type is the annotation; `Optional[...]` when the YAML may say null; `minimum` / `maximum` / `choices` as needed).
`tests/test_config_schema.py` fails for any YAML key without an entry here, naming it. The types are checked by
OmegaConf (structured configs); `minimum`, `maximum` and `choices` by `check_values`; checks between keys by
`CROSS_CHECKS`. `python eval.py --help-config` (train.py, extract.py too) lists the keys with their help.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from lxmert_pl.errors import ConfigError

PRECISION_ALIASES = {"fp32": "32-true", "32": "32-true", "bf16": "bf16-true", "fp16": "16-mixed"}


def key(help: str, *, minimum: float | None = None, maximum: float | None = None,
        choices: tuple[Any, ...] | None = None) -> Any:
    """A schema entry: the default comes from the YAML (MISSING here), the rest is the entry's metadata."""
    return field(default=MISSING, metadata={"help": help, "minimum": minimum, "maximum": maximum, "choices": choices})


def block(cls: type) -> Any:
    return field(default_factory=cls)


# ---- configs/shared/*.yaml -------------------------------------------------------------------------------------
@dataclass
class Trainer:
    accelerator: str = key("where to run", choices=("cpu", "gpu", "cuda", "mps", "auto"))
    devices: int = key("devices (processes) per node; > 1 runs DDP", minimum=1)
    num_nodes: int = key("machines (torchrun / SLURM)", minimum=1)
    strategy: str = key("auto (DDP when devices * num_nodes > 1) or a Lightning strategy name")
    ddp_timeout_minutes: float = key("longest wait of a process for the others at a barrier", minimum=0.01)


PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-mixed")


@dataclass
class Wandb:
    project: Optional[str] = key("Weights & Biases project (null: no wandb)")
    entity: Optional[str] = key("wandb team or user (null: your default)")
    mode: str = key("wandb mode", choices=("auto", "online", "offline", "disabled"))
    table_rows: int = key("at most this many per-pair predictions in the wandb Table", minimum=0)


@dataclass
class Logger:
    csv: bool = key("metrics CSV under <out>/csv")
    wandb: Wandb = block(Wandb)


@dataclass
class Detector:
    ckpt: Optional[str] = key("Faster R-CNN weights: registry alias, directory or file")
    geometry: Optional[str] = key("proposal layer (null: the registry's for an alias, else port)",
                                  choices=("port", "caffe"))
    precision: str = key("RoI head precision", choices=("fp32", "bf16"))
    config: Optional[str] = key("the detector's config.yaml, when not beside the weights")
    min_boxes: int = key("at least this many boxes per image", minimum=1)
    max_boxes: int = key("at most this many boxes per image", minimum=1)
    batch_size: int = key("images per detector forward pass", minimum=1)


# ---- configs/eval.yaml -------------------------------------------------------------------------------------------
@dataclass
class EvalData:
    pairs: Optional[str] = key("pair file: seed JSON, JSONL/CSV or LXMERT caption file")
    features: List[str] = key("obj36 TSV files and/or binary stores")
    images: Optional[str] = key("folder of raw images (one-step matching)")
    given_boxes: Optional[str] = key("JSON {img_id: boxes}: extract features at these boxes")
    source: str = key("where image features come from", choices=("auto", "features", "images"))
    batch_size: int = key("pairs per forward pass", minimum=1)
    num_workers: int = key("DataLoader workers per process", minimum=0)
    max_seq_length: int = key("tokens incl. [CLS]/[SEP]", minimum=3)
    skip_missing: bool = key("skip (and count) pairs whose image no feature source has")


@dataclass
class Retrieval:
    captions: Optional[str] = key("Karpathy split file, LXMERT caption file or pair file")
    split: Optional[str] = key("Karpathy split (null: every image)", choices=("train", "val", "test", "restval"))
    caption_source: str = key("LXMERT caption files: which sentf source")
    skip_blank: bool = key("skip (and count) blank captions instead of failing")
    k: Optional[int] = key("re-rank the first stage's top K per query (null: full grid)", minimum=1)
    image_block: int = key("images per block (the unit of sharding and resume)", minimum=1)
    caption_block: int = key("captions per block (full grid)", minimum=1)
    max_blocks: Optional[int] = key("stop each process after this many blocks (null: no limit)", minimum=1)
    save_scores_max: int = key("write scores.npy when images x captions is at most this", minimum=0)
    worst_queries: int = key("rows of the wandb table of the worst-ranked queries", minimum=0)


@dataclass
class Benchmark:
    name: Optional[str] = key("task=benchmark: which benchmark", choices=("winoground", "valse", "negatives"))
    data: Optional[str] = key("the benchmark's file or folder (winoground also hf://datasets/facebook/winoground)")
    valid_only: bool = key("valse: score only the items annotators validated, as the paper does")


@dataclass
class Report:
    enabled: bool = key("write report.html with the results (`report=false` is short for report.enabled=false)")
    cards: int = key("cards per gallery (0: no galleries)", minimum=0)
    boxes: int = key("labelled boxes drawn per card, most confident first", minimum=0)
    why: int = key("boxes the sentence attends to most, outlined per card (0: none)", minimum=0)
    thumbnail: int = key("long side of a card's picture in pixels", minimum=16, maximum=2048)
    seed: int = key("seed of the sample of correct pairs")
    retrieval_queries: int = key("retrieval runs: the worst-ranked queries shown", minimum=0)


@dataclass
class EvalModel:
    compile: bool = key("torch.compile each LXRT layer (inductor; CUDA graphs on CUDA); the first batch compiles")


@dataclass
class EvalDetector(Detector):
    cache: bool = key("keep extracted features in <out>/image_features.tsv and reuse them")


@dataclass
class EvalTrainer(Trainer):
    precision: str = key("numeric precision of the LXMERT forward", choices=PRECISIONS)


@dataclass
class EvalConfig:
    task: str = key("matching: score pairs | retrieval: rank images x captions | benchmark: winoground, valse, "
                    "negatives", choices=("matching", "retrieval", "benchmark"))
    ckpt: str = key("LXMERT weights: registry alias or path")
    model_config: Optional[str] = key("architecture JSON (null: the checkpoint's own, beside it, else lxr955)")
    mode: str = key("itm: matching head probability | cosine: max cosine over boxes", choices=("itm", "cosine"))
    threshold: Optional[float] = key("answer True when score > threshold (itm: [0, 1], cosine: [-1, 1])")
    skip_nonfinite: bool = key("leave NaN/inf scores out (counted) instead of failing")
    factorize: str = key("encode repeated sentences/images once per batch", choices=("auto", "always", "never"))
    test: Optional[str] = key("pairs + features of configs/test/<test>.yaml")
    name: Optional[str] = key("run name (null: the test or pair file name)")
    out: Optional[str] = key("output folder (null: outputs/<name>)")
    card: Optional[str] = key("model card (README.md or its folder) to add this run's metrics to")
    overwrite: bool = key("delete resumable results in --out made otherwise and start afresh (else: refused)")
    model: EvalModel = block(EvalModel)
    data: EvalData = block(EvalData)
    retrieval: Retrieval = block(Retrieval)
    benchmark: Benchmark = block(Benchmark)
    report: Report = block(Report)
    detector: EvalDetector = block(EvalDetector)
    trainer: EvalTrainer = block(EvalTrainer)
    logger: Logger = block(Logger)


# ---- configs/train.yaml ------------------------------------------------------------------------------------------
@dataclass
class TrainData:
    train: Optional[str] = key("labelled pairs, or captions (negatives made on the fly)")
    val: Optional[str] = key("labelled validation pairs (null: no validation)")
    features: List[str] = key("obj36 TSV files and/or binary stores")
    negative_ratio: float = key("captions only: probability of a replaced (negative) caption", minimum=0, maximum=1)
    batch_size: int = key("pairs per optimizer batch", minimum=1)
    num_workers: int = key("DataLoader workers per process", minimum=0)
    max_seq_length: int = key("tokens incl. [CLS]/[SEP]", minimum=3)
    skip_missing: bool = key("skip (and count) pairs whose image no feature source has")


@dataclass
class Model:
    finetune: str = key("what is trained", choices=("all", "head", "top-k"))
    top_k_cross: int = key("finetune=top-k: the last this many cross layers are trained", minimum=0)


@dataclass
class Optim:
    lr: float = key("AdamW peak learning rate", minimum=0)
    weight_decay: float = key("AdamW weight decay (not on biases and LayerNorms)", minimum=0)
    warmup_ratio: float = key("fraction of the steps of linear warm-up", minimum=0, maximum=1)
    grad_clip: Optional[float] = key("gradient-norm clipping (null: none)", minimum=0)
    accumulate: int = key("batches per optimizer step", minimum=1)


@dataclass
class TrainTrainer(Trainer):
    precision: str = key("numeric precision of training", choices=PRECISIONS)
    max_epochs: int = key("epochs; 0 would train nothing (the LR schedule spans all of them)", minimum=1)
    max_steps: int = key("-1: no limit, else stop after this many optimizer steps", minimum=-1)
    log_every_n_steps: int = key("log every this many steps", minimum=1)
    checkpoint_every_n_steps: Optional[int] = key("also write last.ckpt every N optimizer steps", minimum=1)
    early_stopping_patience: Optional[int] = key("stop after this many validations without a better ROC-AUC",
                                                 minimum=1)


@dataclass
class TrainConfig:
    ckpt: Optional[str] = key("starting weights: alias or path")
    model_config: Optional[str] = key("architecture JSON (null: the checkpoint's own, beside it, else lxr955)")
    resume: Optional[str] = key("a train.py last.ckpt to resume exactly")
    name: Optional[str] = key("run name (null: train_<train file name>)")
    out: Optional[str] = key("output folder (null: outputs/<name>)")
    seed: int = key("seed of data order, negatives and dropout", minimum=0)
    data: TrainData = block(TrainData)
    model: Model = block(Model)
    optim: Optim = block(Optim)
    trainer: TrainTrainer = block(TrainTrainer)
    logger: Logger = block(Logger)


# ---- configs/extract.yaml ----------------------------------------------------------------------------------------
@dataclass
class ExtractConfig:
    images: Optional[str] = key("image folder, or a list file of image paths")
    out: Optional[str] = key("output obj36 TSV (resumed when it exists)")
    given_boxes: Optional[str] = key("JSON {img_id: boxes}: pool these boxes instead of detecting")
    show: int = key("draw the first N images of the TSV with their labelled boxes into <out>.show/", minimum=0)
    detector: Detector = block(Detector)
    trainer: Trainer = block(Trainer)


SCHEMAS: dict[str, type] = {"eval": EvalConfig, "train": TrainConfig, "extract": ExtractConfig}


# ---- checks between keys -----------------------------------------------------------------------------------------
def _boxes(cfg: DictConfig) -> str | None:
    det = cfg.get("detector")
    if det is not None and det.min_boxes > det.max_boxes:
        return f"detector.min_boxes ({det.min_boxes}) is larger than detector.max_boxes ({det.max_boxes})"
    return None


def _threshold(cfg: DictConfig) -> str | None:
    if "threshold" not in cfg or cfg.threshold is None:
        return None
    low, high = (0.0, 1.0) if cfg.mode == "itm" else (-1.0, 1.0)
    if not math.isfinite(cfg.threshold) or not low <= cfg.threshold <= high:
        return (f"threshold={cfg.threshold} is outside [{low:g}, {high:g}], the range of mode={cfg.mode} scores "
                f"(itm: a probability, cosine: a cosine)")
    return None


def _max_steps(cfg: DictConfig) -> str | None:
    trainer = cfg.get("trainer")
    if trainer is not None and "max_steps" in trainer and trainer.max_steps == 0:
        return "trainer.max_steps=0 is not allowed: -1 (no limit) or a whole number >= 1"
    return None


CROSS_CHECKS: list[Callable[[DictConfig], str | None]] = [_boxes, _threshold, _max_steps]


# ---- validation --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def entries(schema: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """{dotted key: dataclass field} of every leaf key of `schema`."""
    out: dict[str, dataclasses.Field] = {}
    hints = typing.get_type_hints(schema)
    for item in dataclasses.fields(schema):
        kind = hints[item.name]
        if dataclasses.is_dataclass(kind):
            out.update(entries(kind, f"{prefix}{item.name}."))
        else:
            out[f"{prefix}{item.name}"] = item
    return out


def type_name(schema: type, dotted: str) -> str:
    """The key's type in words: "a whole number", "null or a number", ..."""
    owner = schema
    *path, last = dotted.split(".")
    for part in path:
        owner = typing.get_type_hints(owner)[part]
    kind = typing.get_type_hints(owner)[last]
    optional = typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)
    if optional:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    words = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}.get(kind)
    if words is None and typing.get_origin(kind) in (list, List):
        words = "a list of strings"
    return f"null or {words}" if optional else (words or str(kind))


def describe(schema: type, dotted: str) -> str:
    """What the key allows, in words (type, range, choices) and its help."""
    item = entries(schema)[dotted]
    meta = item.metadata
    allowed = type_name(schema, dotted)
    if meta["choices"]:
        allowed = ("null or " if allowed.startswith("null") else "") + "one of " + ", ".join(map(str, meta["choices"]))
    if meta["minimum"] is not None and meta["maximum"] is not None:
        allowed += f" in [{meta['minimum']:g}, {meta['maximum']:g}]"
    elif meta["minimum"] is not None:
        allowed += f" >= {meta['minimum']:g}"
    return f"{allowed} ({meta['help']})"


def _wrap_scalars_of_lists(schema: type, cfg: DictConfig) -> None:
    """A single string given for a list key (`data.features=a.tsv`) is that one-element list."""
    for dotted, item in entries(schema).items():
        kind = typing.get_type_hints(_owner(schema, dotted))[dotted.rsplit(".", 1)[-1]]
        if typing.get_origin(kind) in (list, List):
            value = OmegaConf.select(cfg, dotted, default=None)
            if isinstance(value, str):
                OmegaConf.update(cfg, dotted, [value], merge=False)


def _owner(schema: type, dotted: str) -> type:
    owner = schema
    for part in dotted.split(".")[:-1]:
        owner = typing.get_type_hints(owner)[part]
    return owner


def check_values(schema: type, cfg: DictConfig) -> None:
    """Ranges and choices of every key (the types are already checked); raises ConfigError for the first bad one."""
    for dotted, item in entries(schema).items():
        value = OmegaConf.select(cfg, dotted, default=None)
        meta = item.metadata
        if value is None:
            continue
        bad = (meta["choices"] is not None and value not in meta["choices"]) or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and (
                not math.isfinite(value)
                or (meta["minimum"] is not None and value < meta["minimum"])
                or (meta["maximum"] is not None and value > meta["maximum"])))
        if bad:
            raise ConfigError(f"{dotted}={value}: allowed is {describe(schema, dotted)}")
    for check in CROSS_CHECKS:
        problem = check(cfg)
        if problem:
            raise ConfigError(problem)


@functools.lru_cache(maxsize=None)
def _structured(schema: type) -> DictConfig:
    return OmegaConf.structured(schema)


def structured(schema: type) -> DictConfig:
    """The schema as an OmegaConf structured config (every value MISSING until the YAML fills it)."""
    return _structured(schema).copy()


def validate(base: str, cfg: DictConfig) -> DictConfig:
    """`cfg` (composed from configs/<base>.yaml and the command line) checked against the schema: the same config
    with its values converted to the schema's types ("5" -> 5), as a plain DictConfig in struct mode. Raises
    ConfigError naming the key, the value and what is allowed."""
    schema = SCHEMAS.get(base)
    if schema is None:
        return cfg
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    _wrap_scalars_of_lists(schema, cfg)
    precision = OmegaConf.select(cfg, "trainer.precision", default=None)
    if isinstance(precision, str) and precision in PRECISION_ALIASES:
        cfg.trainer.precision = PRECISION_ALIASES[precision]
    try:
        typed = OmegaConf.merge(structured(schema), cfg)
    except ConfigKeyError as err:
        raise ConfigError(f"config key {err.full_key} (configs/{base}.yaml) has no entry in the schema "
                          f"(lxmert_pl/runs/schema.py): add one") from None
    except (OmegaConfBaseException, TypeError) as err:
        dotted = getattr(err, "full_key", None) or "?"
        value = OmegaConf.select(cfg, dotted, default=None) if dotted != "?" else None
        shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if dotted in entries(schema):
            raise ConfigError(f"{dotted}={shown}: allowed is {describe(schema, dotted)}") from None
        raise ConfigError(f"invalid config value: {str(err).splitlines()[0]}") from None
    missing = [dotted for dotted in entries(schema) if OmegaConf.is_missing(typed, dotted)]
    if missing:
        raise ConfigError(f"configs/{base}.yaml has no value for {', '.join(missing)} (the schema, "
                          f"lxmert_pl/runs/schema.py, lists them): add them to the YAML")
    check_values(schema, typed)
    plain = OmegaConf.create(OmegaConf.to_container(typed))
    OmegaConf.set_struct(plain, True)
    return plain


def help_lines(base: str, defaults: DictConfig | None = None) -> list[str]:
    """One line per key: `key = default: allowed (help)`."""
    schema = SCHEMAS[base]
    lines = []
    for dotted in entries(schema):
        default = OmegaConf.select(defaults, dotted, default=None) if defaults is not None else None
        shown = OmegaConf.to_container(default) if OmegaConf.is_config(default) else default
        lines.append(f"  {dotted} = {'null' if shown is None else shown}: {describe(schema, dotted)}")
    return lines
