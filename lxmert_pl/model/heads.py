"""LXMERT pretraining heads and the matching model that carries them.

`LxmertMatchingModel` holds the backbone (`bert`) and whichever heads a checkpoint provides:

- `cls.seq_relationship`: **the matching head** — Linear(h, 2); logit **index 1 means "matched"**
  (P(match) = softmax(logits)[:, 1]);
- `cls.predictions`: masked-LM head, decoder tied to the word embeddings;
- `obj_predict_head`: object (1600) / attribute (400) / feature (2048) regression heads on the vision stream;
- `answer_head`: the pretraining QA head.

A head the checkpoint lacks is `None` — never randomly initialised behind the user's back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lxmert_pl import MATCHED_INDEX
from lxmert_pl.errors import UserInputError
from lxmert_pl.model.config import LxrtConfig
from lxmert_pl.model.lxrt import EncodedImage, EncodedText, LayerNorm, LxrtModel, LxrtOutput

HEAD_NAMES = ("matching", "lm", "obj", "qa")
SCORE_NAMES = ("itm", "cosine")


def pruning_for(scores: tuple[str, ...] | None) -> tuple[bool, bool]:
    """(cls_only, need_visn) for `LxrtModel.cross` when only these scores are read: None = every output (full
    `lang_output` / `visn_output`); any score needs only [CLS] of the last layer's language stream; the vision
    stream of the last layer only for "cosine"."""
    if scores is None:
        return False, True
    unknown = set(scores) - set(SCORE_NAMES)
    if unknown:
        raise ValueError(f"unknown scores {sorted(unknown)}; valid: {SCORE_NAMES}")
    return True, "cosine" in scores


class HeadTransform(nn.Module):
    """dense -> GeLU -> LayerNorm. Keys: dense, LayerNorm."""

    def __init__(self, config: LxrtConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPredictionHead(nn.Module):
    """Masked-LM logits: transform, then the word-embedding matrix (tied) plus a separate bias."""

    def __init__(self, config: LxrtConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = HeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied, as in the original
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, lang: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(lang)) + self.bias


class PretrainingHeads(nn.Module):
    """`cls.*`: `predictions` (LM, optional) and `seq_relationship` (matching, optional)."""

    def __init__(self, config: LxrtConfig, word_embeddings: nn.Embedding, lm: bool, matching: bool):
        super().__init__()
        self.predictions = LMPredictionHead(config, word_embeddings) if lm else None
        self.seq_relationship = nn.Linear(config.hidden_size, 2) if matching else None


class VisualObjHead(nn.Module):
    """`obj_predict_head`: transform + decoders for object ids, attribute ids and the 2048-d feature."""

    def __init__(self, config: LxrtConfig):
        super().__init__()
        self.transform = HeadTransform(config)
        self.decoder_dict = nn.ModuleDict({
            "obj": nn.Linear(config.hidden_size, config.num_object_labels),
            "attr": nn.Linear(config.hidden_size, config.num_attr_labels),
            "feat": nn.Linear(config.hidden_size, config.visual_feat_dim),
        })

    def forward(self, visn: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.transform(visn)
        return {name: decoder(x) for name, decoder in self.decoder_dict.items()}


class AnswerHead(nn.Module):
    """`answer_head.logit_fc`: Linear(h, 2h) -> GeLU -> LayerNorm(2h) -> Linear(2h, answers)."""

    def __init__(self, config: LxrtConfig):
        super().__init__()
        h = config.hidden_size
        self.logit_fc = nn.Sequential(
            nn.Linear(h, 2 * h), nn.GELU(), LayerNorm(2 * h, eps=config.layer_norm_eps),
            nn.Linear(2 * h, config.num_qa_labels),
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.logit_fc(pooled)


@dataclass
class MatchingOutput:
    lang_output: torch.Tensor
    visn_output: torch.Tensor
    pooled_output: torch.Tensor
    match_logits: torch.Tensor | None  # [B, 2]; index 1 = matched. None without a matching head.
    match_prob: torch.Tensor | None  # [B] = softmax(match_logits)[:, 1]
    cosine: torch.Tensor | None  # [B] max over real boxes of cos(visn_output, pooled_output); None: not asked


def cosine_max_score(visn_output: torch.Tensor, pooled: torch.Tensor, box_mask: torch.Tensor | None) -> torch.Tensor:
    """The seed's "cos" score: max over boxes j of cosine(visn_output[i, j], pooled[i]); padded boxes excluded."""
    cos = F.cosine_similarity(visn_output, pooled[:, None, :].expand_as(visn_output), dim=-1, eps=1e-8)
    if box_mask is not None:
        cos = cos.masked_fill(box_mask == 0, float("-inf"))
    return cos.max(dim=1).values


class LxmertMatchingModel(nn.Module):
    """LXRT backbone + the heads a checkpoint provides (see module docstring)."""

    def __init__(self, config: LxrtConfig, heads: tuple[str, ...] = HEAD_NAMES):
        super().__init__()
        unknown = set(heads) - set(HEAD_NAMES)
        if unknown:
            raise UserInputError(f"unknown heads {sorted(unknown)}; valid: {HEAD_NAMES}")
        self.config = config
        self.bert = LxrtModel(config)
        self.cls = PretrainingHeads(config, self.bert.embeddings.word_embeddings, "lm" in heads, "matching" in heads)
        self.obj_predict_head = VisualObjHead(config) if "obj" in heads else None
        self.answer_head = AnswerHead(config) if "qa" in heads else None
        self.init_weights()

    @property
    def heads(self) -> tuple[str, ...]:
        present = {
            "matching": self.cls.seq_relationship, "lm": self.cls.predictions,
            "obj": self.obj_predict_head, "qa": self.answer_head,
        }
        return tuple(name for name, module in present.items() if module is not None)

    @property
    def has_matching_head(self) -> bool:
        return self.cls.seq_relationship is not None

    def keep_heads(self, keep: tuple[str, ...]) -> "LxmertMatchingModel":
        """Drop the other heads (e.g. for fine-tuning the matching head: no unused parameters under DDP)."""
        if "matching" not in keep:
            self.cls.seq_relationship = None
        if "lm" not in keep:
            self.cls.predictions = None
        if "obj" not in keep:
            self.obj_predict_head = None
        if "qa" not in keep:
            self.answer_head = None
        return self

    def init_weights(self, scheme: str = "bert", std: float = 0.02) -> None:
        """Initialise every parameter.

        `bert`: the original `init_bert_weights` (Linear/Embedding N(0, std), LayerNorm 1/0, biases 0); right for
        BERT-base widths, where 0.02 is close to 1/sqrt(768). `fan_in`: Linear weights N(0, 1/fan_in), Embeddings
        N(0, std) — for training SMALL models from scratch: at width 32, N(0, 0.02) is ~9x below 1/sqrt(32) and the
        matching loss sits on its plateau (0.693) for thousands of steps, since matching needs a word x region
        interaction that a near-linear network cannot start to fit; with `fan_in` it is learned in a few hundred.
        """
        if scheme not in ("bert", "fan_in"):
            raise UserInputError(f"unknown init scheme {scheme!r}; valid: bert, fan_in")
        tied_decoder = getattr(self.cls.predictions, "decoder", None)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not tied_decoder:
                nn.init.normal_(module.weight, std=std if scheme == "bert" else module.weight.shape[1] ** -0.5)
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if self.cls.predictions is not None:
            nn.init.zeros_(self.cls.predictions.bias)

    def match_head(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.cls.seq_relationship is None:
            raise RuntimeError(
                "this model has no matching head (cls.seq_relationship): the checkpoint is a fine-tuned "
                "(e.g. VQA) snapshot. Use cosine scoring (--mode cosine) or a pretraining checkpoint."
            )
        return self.cls.seq_relationship(pooled)

    def heads_from(self, out: LxrtOutput, box_mask: torch.Tensor | None) -> MatchingOutput:
        logits = self.match_head(out.pooled_output) if self.has_matching_head else None
        prob = logits.float().softmax(-1)[:, MATCHED_INDEX] if logits is not None else None
        return MatchingOutput(
            lang_output=out.lang_output,
            visn_output=out.visn_output,
            pooled_output=out.pooled_output,
            match_logits=logits,
            match_prob=prob,
            cosine=None if out.visn_output is None else cosine_max_score(out.visn_output.float(),
                                                                         out.pooled_output.float(), box_mask),
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, features: torch.Tensor,
                boxes: torch.Tensor, box_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, scores: tuple[str, ...] | None = None) -> MatchingOutput:
        """The encoder (`LxrtModel.forward`, same inputs), then the heads. `scores`: None computes every output;
        ("itm",), ("cosine",) or both skip what only unread outputs of the last cross layer need (`pruning_for`):
        then `lang_output` is [CLS] only and, without "cosine", `visn_output` and `cosine` are None."""
        out = self.bert(input_ids, attention_mask, features, boxes, box_mask, token_type_ids, *pruning_for(scores))
        return self.heads_from(out, box_mask)

    def score_cross(self, text: EncodedText, image: EncodedImage,
                    scores: tuple[str, ...] | None = None) -> MatchingOutput:
        """Cross layers + heads on already encoded, row-aligned text and image (factorized scoring); `scores` as
        in `forward`."""
        return self.heads_from(self.bert.cross(text, image, *pruning_for(scores)), image.mask)

    def lm_logits(self, lang_output: torch.Tensor) -> torch.Tensor:
        if self.cls.predictions is None:
            raise RuntimeError("this model has no masked-LM head (cls.predictions)")
        return self.cls.predictions(lang_output)

    def obj_logits(self, visn_output: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.obj_predict_head is None:
            raise RuntimeError("this model has no object head (obj_predict_head)")
        return self.obj_predict_head(visn_output)

    def qa_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.answer_head is None:
            raise RuntimeError("this model has no QA head (answer_head)")
        return self.answer_head(pooled)
