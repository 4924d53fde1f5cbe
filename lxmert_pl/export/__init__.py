"""Export LXMERT matchers for others: the `transformers` layout (`hf.py`) and model cards (`model_card.py`).

    python -m lxmert_pl.export --ckpt ANY_CHECKPOINT --out DIR [--format hf]
"""

from lxmert_pl.export.hf import export_hf, hf_config, hf_state_dict, write_tokenizer_files
from lxmert_pl.export.model_card import (
    EvaluationResult,
    FeatureSpec,
    ModelCard,
    ModelCardError,
    TrainingSummary,
    add_evaluation,
    card_for_checkpoint,
    read_model_card,
    write_model_card,
)

__all__ = [
    "EvaluationResult", "FeatureSpec", "ModelCard", "ModelCardError", "TrainingSummary", "add_evaluation",
    "card_for_checkpoint", "export_hf", "hf_config", "hf_state_dict", "read_model_card", "write_model_card",
    "write_tokenizer_files",
]
