"""Export an LXMERT matcher in the `transformers` layout: a folder `LxmertForPreTraining.from_pretrained` loads.

Files written: `config.json` (HF `LxmertConfig` names, task flags set to the heads present), `model.safetensors`
(transformers' key names through `lxmert_pl.model.loading.to_hf_key`, the inverse of the HF reader's key map; the
LM decoder is left out as it is tied to the word embeddings), the tokenizer (`vocab.txt`, `tokenizer_config.json`,
`special_tokens_map.json`: `AutoTokenizer.from_pretrained` gives our ids, cut at the model's max sequence length) and
the model card `README.md`.

A head the source lacks is not invented: its task flag is off (`task_obj_predict`, `task_qa`: transformers then
builds no such head). transformers always builds the LM and matching heads; without them in the source they stay
randomly initialised there, and the card says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from lxmert_pl.export.model_card import EvaluationResult, ModelCard, write_model_card
from lxmert_pl.fileio import atomic_path, write_atomically
from lxmert_pl.model.heads import LxmertMatchingModel
from lxmert_pl.model.loading import TIED_DECODER_KEY, to_hf_key
from lxmert_pl.tokenizer import SPECIAL_TOKENS, default_vocab_path

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def hf_state_dict(model: LxmertMatchingModel) -> dict[str, torch.Tensor]:
    """The model's tensors under transformers' names, without the tied LM decoder (safetensors stores no aliases)."""
    return {to_hf_key(key): tensor.detach().cpu().contiguous()
            for key, tensor in model.state_dict().items() if key != TIED_DECODER_KEY}


def hf_config(model: LxmertMatchingModel) -> dict:
    """`config.json` content: our sizes (HF names already) plus the model type and the task flags of the heads."""
    heads = set(model.heads)
    return {
        **model.config.to_dict(),
        "model_type": "lxmert",
        "architectures": ["LxmertForPreTraining"],
        "task_matched": "matching" in heads,
        "task_mask_lm": "lm" in heads,
        "task_obj_predict": "obj" in heads,
        "task_qa": "qa" in heads,
        "visual_obj_loss": "obj" in heads,
        "visual_attr_loss": "obj" in heads,
        "visual_feat_loss": "obj" in heads,
    }


def write_tokenizer_files(directory: Path, max_seq_length: int) -> list[Path]:
    """The bert-base-uncased vocabulary and a tokenizer config that reproduces `LxmertTokenizer`'s ids."""
    vocab = directory / "vocab.txt"
    write_atomically(vocab, default_vocab_path().read_bytes())
    pad, unk, cls, sep, mask = SPECIAL_TOKENS
    special = {"pad_token": pad, "unk_token": unk, "cls_token": cls, "sep_token": sep, "mask_token": mask}
    config = {"tokenizer_class": "LxmertTokenizer", "do_lower_case": True, "strip_accents": None,
              "tokenize_chinese_chars": True, "model_max_length": max_seq_length, **special}
    written = [vocab]
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        write_atomically(directory / name, json.dumps(content, indent=2) + "\n")
        written.append(directory / name)
    return written


def export_hf(model: LxmertMatchingModel, directory: str | Path, card: ModelCard,
              evaluations: Sequence[EvaluationResult] = ()) -> list[Path]:
    """Write the HF folder (config, safetensors weights, tokenizer, card with `evaluations`); return the files.

    Every file is first written into a hidden staging folder inside `directory`, and moved into place only when all
    of them are written: a failure (disk full, a file-size limit, an interrupt) leaves `directory` as it was."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=directory))
    try:
        config_path = stage / CONFIG_FILE
        write_atomically(config_path, json.dumps(hf_config(model), indent=2) + "\n")
        with atomic_path(stage / WEIGHTS_FILE) as temp:
            try:
                save_file(hf_state_dict(model), str(temp), metadata={"format": "pt"})
            except Exception as err:  # safetensors reports a failed write as its own error, "... (os error 28)"
                code = re.search(r"os error (\d+)", str(err))
                if type(err).__name__ != "SafetensorError" or code is None:
                    raise
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(temp)) from None
        staged = [config_path, stage / WEIGHTS_FILE, *write_tokenizer_files(stage, card.max_seq_length)]
        card.files = [p.name for p in staged]
        staged.append(write_model_card(stage, card, evaluations))
    except OSError as err:
        if err.filename is None or not str(err.filename).startswith(str(stage)):
            raise
        target = directory / Path(err.filename).name
        raise type(err)(err.errno, f"{err.strerror} (writing the export; nothing in {directory} was replaced)",
                        str(target)) from None
    else:
        written = []
        for path in staged:
            os.replace(path, directory / path.name)
            written.append(directory / path.name)
        return written
    finally:
        shutil.rmtree(stage, ignore_errors=True)
