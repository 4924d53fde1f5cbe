"""LXRT architecture configuration: a dataclass with HF `LxmertConfig` field names, and named presets."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lxmert_pl.errors import UserInputError

# Keys of HF/original config files that carry no architecture information (task flags, bookkeeping).
_IGNORED_CONFIG_KEYS = {
    "model_type", "architectures", "transformers_version", "task_matched", "task_mask_lm", "task_obj_predict",
    "task_qa", "visual_obj_loss", "visual_attr_loss", "visual_feat_loss", "mode", "torch_dtype", "dtype",
    "pad_token_id", "output_attentions", "output_hidden_states", "return_dict", "initializer_range",
}


@dataclass
class LxrtConfig:
    """Sizes of LXRT and its heads. Defaults are the released `lxr955` model (BERT-base, 9/5/5 layers)."""

    vocab_size: int = 30522  # WordPiece vocabulary (bert-base-uncased)
    hidden_size: int = 768  # width of both streams
    num_attention_heads: int = 12
    intermediate_size: int = 3072  # FFN width
    l_layers: int = 9  # language self-attention layers
    x_layers: int = 5  # cross-modality layers
    r_layers: int = 5  # object-relationship (vision self-attention) layers
    visual_feat_dim: int = 2048  # detector feature size per box
    visual_pos_dim: int = 4  # box coordinates (x1, y1, x2, y2), normalised
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"  # exact (erf) GeLU; the only activation the original uses
    num_qa_labels: int = 9500  # pretraining QA head answers (released snapshot: 9500)
    num_object_labels: int = 1600  # Visual Genome object classes
    num_attr_labels: int = 400  # Visual Genome attributes

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise UserInputError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act != "gelu":
            raise UserInputError(f"hidden_act {self.hidden_act!r} is not supported: LXRT uses the exact 'gelu'")

    @classmethod
    def from_dict(cls, values: dict[str, Any], strict: bool = True) -> "LxrtConfig":
        """`strict`: unknown keys are an error (our own configs); False ignores them (foreign config files)."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known - _IGNORED_CONFIG_KEYS
        if unknown and strict:
            raise UserInputError(f"unknown LXRT config keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path, strict: bool = False, given: bool = False) -> "LxrtConfig":
        """Read an HF-style `config.json`; keys that describe no LXRT size are ignored unless `strict`. `given`
        (a file the user named, `--model-config`): a key that is a near miss of a valid one (`hiden_size`) is an
        error listing the valid keys, as it would otherwise be silently ignored."""
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise UserInputError(f"cannot read model config {path}: {err}") from err
        if not isinstance(values, dict):
            raise UserInputError(f"{path}: a model config is a JSON object of sizes, got {type(values).__name__}")
        if given:
            known = sorted(f.name for f in fields(cls))
            typos = {key: difflib.get_close_matches(key, known, n=1, cutoff=0.8)
                     for key in values if key not in known and key not in _IGNORED_CONFIG_KEYS}
            typos = {key: near[0] for key, near in typos.items() if near}
            if typos:
                said = ", ".join(f"{key!r} (did you mean {near!r}?)" for key, near in typos.items())
                raise UserInputError(f"{path}: unknown model config key {said}; valid keys: {', '.join(known)}")
        try:
            return cls.from_dict(values, strict=strict)
        except (TypeError, ValueError) as err:
            raise UserInputError(f"{path}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "LxrtConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, LxrtConfig] = {
    # The released LXMERT model (model_LXRT.pth, unc-nlp/lxmert-base-uncased).
    "lxr955": LxrtConfig(),
    # A tiny model for tests and the bundled demo (same layout as ../shared/golden/lxrt/tiny_config.json).
    "tiny": LxrtConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=2, x_layers=1,
                       r_layers=1, num_qa_labels=9),
}


def get_preset(name: str) -> LxrtConfig:
    try:
        return dataclasses.replace(PRESETS[name])
    except KeyError:
        raise UserInputError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}") from None
