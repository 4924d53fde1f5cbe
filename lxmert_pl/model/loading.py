"""Load LXMERT weights from every format users hold, with an explicit key map per format.

Formats (detected from the file, or named):

| format           | what it is                                           | key map                                          |
|------------------|------------------------------------------------------|--------------------------------------------------|
| `lxrt-pretrain`  | original pretraining snapshot (`model_LXRT.pth`,     | `module.X` -> `X` (all heads kept)                |
|                  | `Epoch20_LXRT.pth`)                                  |                                                  |
| `lxrt-finetuned` | original VQA/GQA/NLVR2 `BEST.pth`                    | `lxrt_encoder.model[.module].bert.X` -> `bert.X`; |
|                  |                                                      | task head `logit_fc.X` -> `answer_head.logit_fc.X`|
|                  |                                                      | (no matching head: cosine scoring only)          |
| `hf`             | HF directory (`config.json` + `pytorch_model.bin` or | `lxmert.X` -> `bert.X`; heads keep their names    |
|                  | `model.safetensors`), or such a weights file alone   |                                                  |
| `lightning`      | this project's own Lightning checkpoints             | `model.X` -> `X`                                 |

Every load returns a `LxrtLoadReport` (loaded / missing / ignored, with reasons). Architecture comes from, in order: an
explicit config, the checkpoint's own (HF `config.json`, Lightning hyper-parameters), a JSON beside the file
(`<name>.config.json`, `<stem>.json` or `config.json`), else the `lxr955` preset — and is checked against the tensor
shapes. Only `torch.load(..., weights_only=True)` is used: a pickle that needs code execution is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from lxmert_pl.errors import CheckpointError  # noqa: F401  (re-exported)
from lxmert_pl.fileio import atomic_writer, write_atomically
from lxmert_pl.model.config import LxrtConfig, get_preset
from lxmert_pl.model.heads import LxmertMatchingModel
from lxmert_pl.weights_file import read_weights_file

FORMATS = ("lxrt-pretrain", "lxrt-finetuned", "hf", "lightning")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# Prefix of each head's parameters, in our (= the original pretraining) names.
HEAD_PREFIXES = {
    "matching": "cls.seq_relationship.",
    "lm": "cls.predictions.",
    "obj": "obj_predict_head.",
    "qa": "answer_head.",
}
TIED_DECODER_KEY = "cls.predictions.decoder.weight"
WORD_EMBEDDINGS_KEY = "bert.embeddings.word_embeddings.weight"


@dataclass
class LxrtLoadReport:
    source: str
    format: str
    config_source: str
    heads: tuple[str, ...]
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # expected by the model, absent (only optional heads)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (source key, reason)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"{self.source} [{self.format}]: loaded {len(self.loaded)} tensors, ignored {len(self.ignored)}; "
            f"heads: {', '.join(self.heads) or 'none'}; config: {self.config_source}"
        ]
        if self.missing:  # optional heads the file does not hold (a missing model tensor is an error, never listed)
            parts.append(f"  not in this file (not built): {', '.join(self.missing)}")
        reasons: dict[str, int] = {}
        for _, reason in self.ignored:
            reasons[reason] = reasons.get(reason, 0) + 1
        parts += [f"  ignored {n}: {reason}" for reason, n in reasons.items()]
        parts += [f"  note: {note}" for note in self.notes]
        return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- reading files


def _hf_weights_file(directory: Path) -> Path:
    for name in HF_WEIGHT_FILES:
        if (directory / name).exists():
            return directory / name
    raise CheckpointError(f"{directory}: HF-format directory without weights (expected one of {HF_WEIGHT_FILES})")


def detect_format(state: dict) -> str:
    """Name the format of a loaded checkpoint object by its keys."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        return "lightning"
    keys = [k for k in state if isinstance(k, str)]
    if not keys or not all(isinstance(state[k], torch.Tensor) for k in keys):
        raise CheckpointError("not an LXMERT state dict (expected a mapping of names to tensors)")
    if any(k.startswith(("lxrt_encoder.model.")) for k in keys):
        return "lxrt-finetuned"
    if any(k.startswith("lxmert.") for k in keys) or any(k.startswith("embeddings.") for k in keys):
        return "hf"
    if any(k.startswith(("module.bert.", "bert.")) for k in keys):
        return "lxrt-pretrain"
    raise CheckpointError(
        f"unrecognised key layout (first keys: {keys[:3]}); known formats: {FORMATS}"
    )


# ------------------------------------------------------------------------------------------------ key maps
# Each maps one source key to our key, or to (None, reason) when the key is deliberately not loaded.

KeyMap = Callable[[str], "tuple[str | None, str]"]


def map_lxrt_pretrain(key: str) -> tuple[str | None, str]:
    return (key[len("module."):] if key.startswith("module.") else key), ""


def map_lxrt_finetuned(key: str) -> tuple[str | None, str]:
    for prefix in ("lxrt_encoder.model.module.bert.", "lxrt_encoder.model.bert."):
        if key.startswith(prefix):
            return "bert." + key[len(prefix):], ""
    if key.startswith("logit_fc."):  # the task's answer head has the pretraining QA head's layout
        return "answer_head." + key, ""
    return None, "unknown key"


# transformers' LxmertForPreTraining names vs ours: the backbone's prefix differs, every head keeps its name
# (`cls.predictions.*`, `cls.seq_relationship.*`, `obj_predict_head.*`, `answer_head.logit_fc.*`). Read by
# `map_hf` (HF -> ours) and `to_hf_key` (ours -> HF, the export): one table for both directions.
HF_PREFIX_MAP = (("lxmert.", "bert."),)
HF_BARE_MODEL_PREFIXES = ("embeddings.", "encoder.", "pooler.")  # a bare LxmertModel (read only)


def map_hf(key: str) -> tuple[str | None, str]:
    for hf_prefix, our_prefix in HF_PREFIX_MAP:
        if key.startswith(hf_prefix):
            return our_prefix + key[len(hf_prefix):], ""
    if key.startswith(HF_BARE_MODEL_PREFIXES):
        return "bert." + key, ""
    return key, ""


def to_hf_key(key: str) -> str:
    """Our parameter name -> transformers' `LxmertForPreTraining` name (the inverse of `map_hf`)."""
    for hf_prefix, our_prefix in HF_PREFIX_MAP:
        if key.startswith(our_prefix):
            return hf_prefix + key[len(our_prefix):]
    return key


def map_lightning(key: str) -> tuple[str | None, str]:
    if key.startswith("model."):
        return key[len("model."):], ""
    return None, "not part of the LXMERT model"


KEY_MAPS: dict[str, KeyMap] = {
    "lxrt-pretrain": map_lxrt_pretrain,
    "lxrt-finetuned": map_lxrt_finetuned,
    "hf": map_hf,
    "lightning": map_lightning,
}


# ---------------------------------------------------------------------------------------------- config checks


def _count_layers(keys: Iterable[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def check_config_against_weights(config: LxrtConfig, weights: dict[str, torch.Tensor], source: str) -> LxrtConfig:
    """Compare layer counts and sizes with the tensors; adopt the QA-head size (a head, not architecture)."""
    problems = []

    def expect(name: str, want: int, got: int, evidence: str) -> None:
        if want != got:
            problems.append(f"{name}: config {want}, checkpoint {got} ({evidence})")

    keys = list(weights)
    expect("l_layers", config.l_layers, _count_layers(keys, "bert.encoder.layer."), "bert.encoder.layer.N")
    expect("x_layers", config.x_layers, _count_layers(keys, "bert.encoder.x_layers."), "bert.encoder.x_layers.N")
    expect("r_layers", config.r_layers, _count_layers(keys, "bert.encoder.r_layers."), "bert.encoder.r_layers.N")
    if WORD_EMBEDDINGS_KEY in weights:
        vocab, hidden = weights[WORD_EMBEDDINGS_KEY].shape
        expect("hidden_size", config.hidden_size, hidden, WORD_EMBEDDINGS_KEY)
        expect("vocab_size", config.vocab_size, vocab, WORD_EMBEDDINGS_KEY)
    inter = weights.get("bert.encoder.layer.0.intermediate.dense.weight")
    if inter is not None:
        expect("intermediate_size", config.intermediate_size, inter.shape[0], "layer.0.intermediate.dense")
    visn = weights.get("bert.encoder.visn_fc.visn_fc.weight")
    if visn is not None:
        expect("visual_feat_dim", config.visual_feat_dim, visn.shape[1], "visn_fc.visn_fc.weight")
    if problems:
        raise CheckpointError(
            f"{source}: the model config does not match the checkpoint:\n  " + "\n  ".join(problems)
            + "\nPass the right architecture with --model-config CONFIG.json (HF LxmertConfig field names)."
        )
    qa = weights.get("answer_head.logit_fc.3.weight")
    if qa is not None and qa.shape[0] != config.num_qa_labels:
        config = config.replace(num_qa_labels=qa.shape[0])
    for name, key in (("num_object_labels", "obj_predict_head.decoder_dict.obj.weight"),
                      ("num_attr_labels", "obj_predict_head.decoder_dict.attr.weight")):
        if key in weights and weights[key].shape[0] != getattr(config, name):
            config = config.replace(**{name: weights[key].shape[0]})
    return config


def _config_beside(path: Path) -> Path | None:
    if path.is_dir():
        return path / "config.json" if (path / "config.json").exists() else None
    for candidate in (path.with_name(path.name + ".config.json"), path.with_suffix(".json"),
                      path.with_name("config.json")):
        if candidate.exists() and candidate != path:
            return candidate
    return None


# --------------------------------------------------------------------------------------------------- loading


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str, LxrtConfig | None, str]:
    """(raw state dict, format, embedded config or None, description of that config)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    embedded, config_source = None, ""
    if path.is_dir():
        state = read_weights_file(_hf_weights_file(path))
    else:
        state = read_weights_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    try:
        fmt = detect_format(state)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    if fmt == "lightning":
        hparams = state.get("hyper_parameters") or {}
        if "model_config" in hparams:
            embedded, config_source = LxrtConfig.from_dict(dict(hparams["model_config"])), "lightning hyper-parameters"
        state = state["state_dict"]
    return state, fmt, embedded, config_source


def load_lxmert(
    path: str | Path,
    *,
    model_config: str | Path | LxrtConfig | None = None,
    require: Iterable[str] = (),
) -> tuple[LxmertMatchingModel, LxrtLoadReport]:
    """Build the model a checkpoint describes and load it.

    `require`: head names that must be present (e.g. `("matching",)` for matching-head scoring); a missing one is
    a `CheckpointError` that says what to use instead.
    """
    path = Path(path)
    raw, fmt, embedded, config_source = read_checkpoint(path)
    key_map = KEY_MAPS[fmt]

    weights: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    ignored: list[tuple[str, str]] = []
    for key, tensor in raw.items():
        ours, reason = key_map(key)
        if ours is None:
            ignored.append((key, reason))
            continue
        weights[ours], origin[ours] = tensor, key

    head_in = weights.get("answer_head.logit_fc.0.weight")
    if fmt == "lxrt-finetuned" and head_in is not None and head_in.shape[1] != head_in.shape[0] // 2:
        # e.g. NLVR2's head reads two images' pooled outputs (2h -> 2h): not a QA head over one pair.
        for key in [k for k in weights if k.startswith("answer_head.")]:
            ignored.append((origin.pop(key), "task head with another input layout (e.g. NLVR2), not used"))
            del weights[key]

    if isinstance(model_config, LxrtConfig):
        config, config_source = model_config, "given"
    elif model_config is not None:
        config, config_source = LxrtConfig.from_json(model_config, given=True), str(model_config)
    elif embedded is not None:
        config = embedded
    elif (beside := _config_beside(path)) is not None:
        config, config_source = LxrtConfig.from_json(beside), str(beside)
    else:
        config, config_source = get_preset("lxr955"), "preset lxr955"
    config = check_config_against_weights(config, weights, str(path))

    heads = tuple(name for name, prefix in HEAD_PREFIXES.items() if any(k.startswith(prefix) for k in weights))
    missing_required = [h for h in require if h not in heads]
    if missing_required:
        hint = ""
        if "matching" in missing_required:
            hint = (" It has no matching head (cls.seq_relationship) — fine-tuned snapshots (VQA/GQA/NLVR2, "
                    "unc-nlp/lxmert-vqa-uncased) drop it. Score with --mode cosine, or use a pretraining checkpoint.")
        raise CheckpointError(f"{path} [{fmt}]: required heads {missing_required} are missing.{hint}")

    model = LxmertMatchingModel(config, heads=heads)
    expected = model.state_dict()
    report = LxrtLoadReport(str(path), fmt, config_source, heads)
    report.missing = [f"{name} head ({prefix}*)" for name, prefix in HEAD_PREFIXES.items() if name not in heads]

    missing = [k for k in expected if k not in weights and not (k == TIED_DECODER_KEY and WORD_EMBEDDINGS_KEY in weights)]
    if missing:
        raise CheckpointError(
            f"{path} [{fmt}]: {len(missing)} model tensors are missing from the checkpoint, e.g. {missing[:5]}"
        )
    for key, tensor in weights.items():
        if key not in expected:
            ignored.append((origin[key], "unknown key"))
        elif tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path} [{fmt}]: shape mismatch at {origin[key]!r} (-> {key}): checkpoint {tuple(tensor.shape)}, "
                f"model {tuple(expected[key].shape)}"
            )
    usable = {k: v for k, v in weights.items() if k in expected}
    if TIED_DECODER_KEY in usable and WORD_EMBEDDINGS_KEY in usable:
        if not torch.equal(usable[TIED_DECODER_KEY], usable[WORD_EMBEDDINGS_KEY]):
            report.notes.append("LM decoder weight differs from the word embeddings; the tied word embeddings are used")
        del usable[TIED_DECODER_KEY]  # tied: loading it again would overwrite the embeddings
        report.loaded.append(TIED_DECODER_KEY)
    model.load_state_dict(usable, strict=False)
    model.eval()
    report.loaded.extend(usable)
    report.ignored = ignored
    return model, report


def save_hf_directory(model: LxmertMatchingModel, directory: str | Path) -> Path:
    """Write `config.json` + `pytorch_model.bin` in HF key names (used by tests and conversions)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {to_hf_key(k): v for k, v in model.state_dict().items()}
    with atomic_writer(directory / "pytorch_model.bin", "wb") as handle:
        torch.save(state, handle)
    write_atomically(directory / "config.json", json.dumps({**model.config.to_dict(), "model_type": "lxmert"}, indent=2))
    return directory
