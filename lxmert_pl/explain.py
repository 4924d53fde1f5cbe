"""Why did the model answer so: which boxes the sentence attends to in the last cross-modality layer.

The weight of box j for a pair is the language -> vision attention of the LAST cross-modality layer, from the first
token ([CLS], whose output the matching head reads through the pooler), averaged over the heads. Padded boxes get 0;
each row sums to 1 over the real boxes. It is a look at one attention map, not an attribution method: read it as
"where the [CLS] token looked last", not as "what caused the score".

Computed in a separate pass over the pairs one wants to show (a report's cards), never in the scoring loop: the
fused attention kernel there does not return probabilities.
"""

from __future__ import annotations

import torch

from lxmert_pl.model.heads import LxmertMatchingModel
from lxmert_pl.model.lxrt import EncodedImage, EncodedText


@torch.no_grad()
def cross_attention_to_boxes(model: LxmertMatchingModel, text: EncodedText, image: EncodedImage) -> torch.Tensor:
    """[B, N] attention weights of the first token over the boxes in the last cross layer (rows of aligned pairs)."""
    lang, visn = text.hidden, image.hidden
    layers = model.bert.encoder.x_layers
    for layer in layers[:-1]:
        lang, visn = layer(lang, text.bias, visn, image.bias)
    # The last layer's first step: language queries over vision keys through the shared `visual_attention` module.
    probs = layers[-1].visual_attention.att.attention_probs(lang, visn, image.bias)  # [B, heads, L, N]
    weights = probs[:, :, 0, :].mean(dim=1)
    if image.mask is not None:
        weights = weights * image.mask.to(weights.dtype)
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return weights


@torch.no_grad()
def explain_batch(model: LxmertMatchingModel, batch: dict) -> torch.Tensor:
    """[B, N] box weights for a collated batch (input_ids, attention_mask, token_type_ids, features, boxes, box_mask),
    every pair through both encoders (no factorization: a report explains a few dozen pairs)."""
    bert = model.bert
    text = bert.encode_text(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
    image = bert.encode_image(batch["features"], batch["boxes"], batch.get("box_mask"))
    return cross_attention_to_boxes(model, text, image)


__all__ = ["cross_attention_to_boxes", "explain_batch"]
