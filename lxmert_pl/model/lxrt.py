"""LXRT: the LXMERT cross-modality encoder, wired exactly as the original `src/lxrt/modeling.py`.

Data flow (`LxrtModel.forward`):

    tokens --Embeddings--> l_layers x BertLayer ------------\
                                                             +--> x_layers x CrossModalityLayer --> (lang, visn)
    feats, boxes --VisualFeatEncoder--> r_layers x BertLayer /                                    lang[:, 0] -> Pooler

Module and parameter names follow the original checkpoints (`bert.encoder.x_layers.N.visual_attention.att.query`,
...), so the key maps in `loading.py` only rename prefixes. Attention runs through
`torch.nn.functional.scaled_dot_product_attention`; both streams take a padding mask (1 = real token / box).

The three stages are separate methods (`encode_text`, `encode_image`, `cross`) because only the cross-modality
layers depend on the pairing: factorized scoring runs the first two once per unique caption / image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lxmert_pl.model.config import LxrtConfig

# The original turns a 0/1 mask into an additive bias of -10000 on the attention scores (not -inf).
MASK_BIAS = -10000.0


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` that stays and computes in fp32 when the model is cast to bf16/fp16.

    Rounding the LayerNorm gains to bf16 is the largest single source of bf16-vs-fp32 disagreement; these few
    parameters cost nothing to keep in fp32. In an fp32 model this is exactly `nn.LayerNorm`."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.weight.dtype in (torch.bfloat16, torch.float16):
            super()._apply(lambda t: t.float(), recurse)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if x.device.type == "cpu":  # the CPU kernel takes bf16/fp16 input with fp32 gains, computes in fp32
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


def attention_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """[B, L] mask with 1 = attend -> additive bias [B, 1, 1, L] (0 or -10000), or None for "attend to all"."""
    if mask is None:
        return None
    return ((1.0 - mask[:, None, None, :].to(dtype)) * MASK_BIAS).to(dtype)


def use_fused_qkv(x: torch.Tensor) -> bool:
    """Whether Q, K and V come from one stacked matmul for input `x` (see `fused_qkv_weights`)."""
    return x.device.type == "cuda" and not torch.compiler.is_compiling()


def fused_qkv_weights(att: "MultiHeadAttention", x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`att`'s query, key and value weights [3H, D] and biases [3H] stacked for ONE projection matmul, or None for
    three. Only on CUDA, outside `torch.compile`: there one kernel launch replaces three. On CPU one matmul was
    no faster (1.5% on the FFN-sized matmul, less than stacking the weights costs), so CPU keeps three. The stack
    is cached until a weight changes (pointer or in-place version); with autograd it is rebuilt every call."""
    if not use_fused_qkv(x):
        return None
    params = (att.query.weight, att.key.weight, att.value.weight, att.query.bias, att.key.bias, att.value.bias)
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return torch.cat(params[:3]), torch.cat(params[3:])
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
    cached = att.__dict__.get("_fused_qkv")
    if cached is None or cached[0] != key:
        cached = (key, torch.cat(params[:3]), torch.cat(params[3:]))
        att.__dict__["_fused_qkv"] = cached
    return cached[1], cached[2]


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention of `hidden` (queries) over `context` (keys/values). Keys: query, key, value."""

    def __init__(self, config: LxrtConfig, context_dim: int | None = None):
        super().__init__()
        hidden, context_dim = config.hidden_size, context_dim or config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(context_dim, hidden)
        self.value = nn.Linear(context_dim, hidden)
        self.dropout_p = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def attention_probs(self, hidden: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The softmax probabilities `forward` weights the values with, [B, heads, Lq, Lk] in float32 (no dropout).

        The one place the model's attention can be looked at (lxmert_pl/explain.py); computed explicitly here, since
        the fused `scaled_dot_product_attention` in `forward` does not return them."""
        q, k = self._heads(self.query(hidden)), self._heads(self.key(context))
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.head_dim ** -0.5
        if bias is not None:
            scores = scores + bias.float()
        return scores.softmax(dim=-1)

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = out.shape
        return out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """SDPA of projected [B, Lq, H] queries over [B, Lk, H] keys/values -> [B, Lq, H] (heads merged)."""
        out = F.scaled_dot_product_attention(
            self._heads(q), self._heads(k), self._heads(v), attn_mask=bias,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        return self._merge(out)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.attend(self.query(hidden), self.key(context), self.value(context), bias)

    def self_attention(self, x: torch.Tensor, bias: torch.Tensor | None, queries: int | None = None) -> torch.Tensor:
        """`forward(x[:, :queries], x, bias)`; with all positions as queries, Q, K and V come from one matmul when
        `fused_qkv` says so."""
        if queries is not None:
            return self.forward(x[:, :queries], x, bias)
        fused = fused_qkv_weights(self, x)
        if fused is None:
            return self.forward(x, x, bias)
        q, k, v = F.linear(x, *fused).chunk(3, dim=-1)
        return self.attend(q, k, v, bias)


class AddAndNorm(nn.Module):
    """Post-LN residual: LayerNorm(residual + dropout(dense(x))). Keys: dense, LayerNorm."""

    def __init__(self, config: LxrtConfig, in_dim: int | None = None):
        super().__init__()
        self.dense = nn.Linear(in_dim or config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class SelfAttentionBlock(nn.Module):
    """Self-attention + add & norm. Keys: self.{query,key,value}, output.{dense,LayerNorm}."""

    def __init__(self, config: LxrtConfig):
        super().__init__()
        self.self = MultiHeadAttention(config)
        self.output = AddAndNorm(config)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, queries: int | None = None) -> torch.Tensor:
        """`queries`: only the first `queries` positions as queries (all positions still keys and values)."""
        return self.output(self.self.self_attention(x, bias, queries), x if queries is None else x[:, :queries])


class CrossAttentionBlock(nn.Module):
    """Cross-attention + add & norm. Keys: att.{query,key,value}, output.{dense,LayerNorm}."""

    def __init__(self, config: LxrtConfig):
        super().__init__()
        self.att = MultiHeadAttention(config)
        self.output = AddAndNorm(config)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_bias: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.att(x, context, context_bias), x)

    def both_ways(self, lang: torch.Tensor, lang_bias: torch.Tensor | None, visn: torch.Tensor,
                  visn_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(forward(lang, visn, visn_bias), forward(visn, lang, lang_bias))` with the projections and the output
        block run once on both streams' positions together (the two directions share these weights)."""
        both = torch.cat([lang, visn], dim=1)
        att, length = self.att, lang.shape[1]
        fused = fused_qkv_weights(att, both)
        if fused is None:
            q, k, v = att.query(both), att.key(both), att.value(both)
        else:
            q, k, v = F.linear(both, *fused).chunk(3, dim=-1)
        lang_att = att.attend(q[:, :length], k[:, length:], v[:, length:], visn_bias)
        visn_att = att.attend(q[:, length:], k[:, :length], v[:, :length], lang_bias)
        out = self.output(torch.cat([lang_att, visn_att], dim=1), both)
        # Contiguous halves: a strided [B, L, H] slice sends the next linear down a slower matmul path (measured:
        # 7.0 vs 4.6 ms for the language stream's 32 x 20 rows at 768, copy included).
        return out[:, :length].contiguous(), out[:, length:].contiguous()


class Intermediate(nn.Module):
    """FFN expansion with exact GeLU. Key: dense."""

    def __init__(self, config: LxrtConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """Self-attention then FFN: the language (`layer.N`) and object-relationship (`r_layers.N`) layers."""

    def __init__(self, config: LxrtConfig):
        super().__init__()
        self.attention = SelfAttentionBlock(config)
        self.intermediate = Intermediate(config)
        self.output = AddAndNorm(config, in_dim=config.intermediate_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class CrossModalityLayer(nn.Module):
    """One x-layer: (1) cross-attention both ways in parallel with ONE shared `visual_attention` module,
    (2) self-attention per stream, (3) FFN per stream."""

    def __init__(self, config: LxrtConfig):
        super().__init__()
        self.visual_attention = CrossAttentionBlock(config)  # shared by lang->visn and visn->lang
        self.lang_self_att = SelfAttentionBlock(config)
        self.visn_self_att = SelfAttentionBlock(config)
        self.lang_inter = Intermediate(config)
        self.lang_output = AddAndNorm(config, in_dim=config.intermediate_size)
        self.visn_inter = Intermediate(config)
        self.visn_output = AddAndNorm(config, in_dim=config.intermediate_size)

    def forward(
        self,
        lang: torch.Tensor,
        lang_bias: torch.Tensor | None,
        visn: torch.Tensor,
        visn_bias: torch.Tensor | None,
        cls_only: bool = False,
        need_visn: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`cls_only`: the language stream's output only at [CLS] ([B, 1, H]; its other positions still serve as
        keys and values); `need_visn` False: no vision output (None). Both only for a last layer whose other
        outputs nobody reads: the [CLS] row and the vision rows that are computed equal the full layer's."""
        if need_visn:
            lang_att, visn_att = self.visual_attention.both_ways(lang, lang_bias, visn, visn_bias)
        else:
            lang_att, visn_att = self.visual_attention(lang, visn, visn_bias), None
        lang_att = self.lang_self_att(lang_att, lang_bias, queries=1 if cls_only else None)
        lang_out = self.lang_output(self.lang_inter(lang_att), lang_att)
        if visn_att is None:
            return lang_out, None
        visn_att = self.visn_self_att(visn_att, visn_bias)
        visn_out = self.visn_output(self.visn_inter(visn_att), visn_att)
        return lang_out, visn_out


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout (BERT)."""

    def __init__(self, config: LxrtConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class VisualFeatEncoder(nn.Module):
    """(LN_f(Linear_f(features)) + LN_b(Linear_b(boxes))) / 2, then dropout: two separate LayerNorms, no LN after."""

    def __init__(self, config: LxrtConfig):
        super().__init__()
        self.visn_fc = nn.Linear(config.visual_feat_dim, config.hidden_size)
        self.visn_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.box_fc = nn.Linear(config.visual_pos_dim, config.hidden_size)
        self.box_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        x = self.visn_layer_norm(self.visn_fc(features))
        y = self.box_layer_norm(self.box_fc(boxes))
        return self.dropout((x + y) / 2)


class LxrtEncoder(nn.Module):
    """Keys: visn_fc, layer.N (language), r_layers.N (vision), x_layers.N (cross)."""

    def __init__(self, config: LxrtConfig):
        super().__init__()
        self.visn_fc = VisualFeatEncoder(config)
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.l_layers))
        self.x_layers = nn.ModuleList(CrossModalityLayer(config) for _ in range(config.x_layers))
        self.r_layers = nn.ModuleList(BertLayer(config) for _ in range(config.r_layers))


class Pooler(nn.Module):
    """tanh(dense(lang[:, 0])): the [CLS] position of the language stream after the cross layers."""

    def __init__(self, config: LxrtConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, lang: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(lang[:, 0]))


@dataclass
class LxrtOutput:
    lang_output: torch.Tensor  # [B, L, H], padding positions included ([B, 1, H]: [CLS] only, `cls_only`)
    visn_output: torch.Tensor | None  # [B, N, H], padded boxes included (None: not computed, `need_visn` False)
    pooled_output: torch.Tensor  # [B, H]


@dataclass
class EncodedText:
    hidden: torch.Tensor  # [T, L, H] after the language layers
    bias: torch.Tensor | None  # [T, 1, 1, L] additive attention bias


@dataclass
class EncodedImage:
    hidden: torch.Tensor  # [I, N, H] after the object-relationship layers
    bias: torch.Tensor | None  # [I, 1, 1, N] additive attention bias (None: all boxes real)
    mask: torch.Tensor | None  # [I, N] 1 = real box


class LxrtModel(nn.Module):
    """The LXRT backbone (checkpoint prefix `bert.`): embeddings, encoder, pooler."""

    def __init__(self, config: LxrtConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = LxrtEncoder(config)
        self.pooler = Pooler(config)

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> EncodedText:
        """Embeddings + language layers (pairing-independent)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        bias = attention_bias(attention_mask, x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return EncodedText(x, bias)

    def encode_image(
        self, features: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor | None = None
    ) -> EncodedImage:
        """Visual embedding + object-relationship layers (pairing-independent). `box_mask` 1 = real box."""
        param_dtype = self.encoder.visn_fc.visn_fc.weight.dtype
        x = self.encoder.visn_fc(features.to(param_dtype), boxes.to(param_dtype))
        bias = attention_bias(box_mask, x.dtype)
        for layer in self.encoder.r_layers:
            x = layer(x, bias)
        return EncodedImage(x, bias, box_mask)

    def cross(self, text: EncodedText, image: EncodedImage, cls_only: bool = False,
              need_visn: bool = True) -> LxrtOutput:
        """Cross-modality layers and pooler for aligned rows of `text` and `image`. `cls_only` / `need_visn` False
        leave out what only the LAST layer's other outputs need (see `CrossModalityLayer.forward`): the pooled
        output is the same."""
        lang, visn = text.hidden, image.hidden
        last = len(self.encoder.x_layers) - 1
        for i, layer in enumerate(self.encoder.x_layers):
            lang, visn = layer(lang, text.bias, visn, image.bias, cls_only and i == last, need_visn or i < last)
        return LxrtOutput(lang, visn, self.pooler(lang))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        features: torch.Tensor,
        boxes: torch.Tensor,
        box_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        cls_only: bool = False,
        need_visn: bool = True,
    ) -> LxrtOutput:
        text = self.encode_text(input_ids, attention_mask, token_type_ids)
        image = self.encode_image(features, boxes, box_mask)
        return self.cross(text, image, cls_only, need_visn)
