"""The fine-tuning run behind `train.py`: pairs/captions + features -> TrainingDataModule -> MatchingModule.fit.

Checkpoints go to `<out>/checkpoints/`: `best.ckpt` (weights of the highest val ROC-AUC) and `last.ckpt` (full state:
optimizer, scheduler, loop progress, data position and the run's settings, for an exact `--resume`; see
`lxmert_pl.runs.checkpointing`). Both load directly in `eval.py --ckpt PATH` and as `train.py --ckpt PATH` (weights
only, a new run). What the run guarantees on a crash, an interrupt, a rerun, a changed setting or bad input is in
docs/reliability.md ("Training").
"""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint

from lxmert_pl.data.train_datamodule import TrainingDataModule
from lxmert_pl.errors import InterruptedRunError, LxmertPlError, UserInputError
from lxmert_pl.features.sources import expand_feature_paths, open_feature_source
from lxmert_pl.export import TrainingSummary, card_for_checkpoint, write_model_card
from lxmert_pl.export.model_card import describe_checkpoint
from lxmert_pl.model.loading import load_lxmert
from lxmert_pl.registry import ResolvedCheckpoint, resolve_checkpoint
from lxmert_pl.fileio import write_atomically
from lxmert_pl.runs.checkpointing import ResumeCheckpoint, check_resume, read_resume_point, run_record
from lxmert_pl.runs.config import REPO_ROOT
from lxmert_pl.runs.console import say
from lxmert_pl.runs.errors import lightning_settings
from lxmert_pl.runs.loggers import PairsPerSecondBar, build_loggers
from lxmert_pl.runs.module import MatchingModule, TrainingSettings
from lxmert_pl.runs.outputs import metrics_table
from lxmert_pl.runs.placement import choose_strategy

MONITOR = "val/roc_auc"  # best.ckpt, early stopping and the non-finite check follow this metric


class NonFiniteValidationError(LxmertPlError):
    """Validation gave NaN/inf scores or a NaN/inf ROC-AUC: training diverged, or the validation data are not finite."""


class FiniteValidation(Callback):
    """Stops training, with a message, when validation scores or the monitored metric are NaN or infinite. Without
    it, NaN scores still give a plausible ROC-AUC (ties) and training goes on choosing best.ckpt on meaningless
    numbers, and a NaN metric stops an EarlyStopping run without a word."""

    def on_validation_end(self, trainer, pl_module) -> None:
        scores = (getattr(pl_module, "results", None) or {}).get("score")
        bad = int((~torch.isfinite(scores)).sum()) if scores is not None else 0
        value = trainer.callback_metrics.get(MONITOR)
        if bad or (value is not None and not math.isfinite(float(value))):
            total = len(scores) if scores is not None else 0
            raise NonFiniteValidationError(
                f"training stopped after epoch {trainer.current_epoch} (global step {trainer.global_step}): "
                f"{bad} of {total} validation scores are not finite (val {MONITOR.split('/')[-1]}: "
                f"{float(value) if value is not None else None}): training diverged (try a lower optim.lr) or the "
                "validation features hold NaN/inf")


def _require(path: str | None, what: str) -> str:
    if not path:
        raise UserInputError(f"no {what} given")
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return str(path)


def check_run_length(cfg: DictConfig) -> None:
    """Refuse lengths that would train nothing (and so write no checkpoint) or forever (no LR schedule)."""
    max_epochs, max_steps = cfg.trainer.max_epochs, cfg.trainer.max_steps
    if not isinstance(max_epochs, int) or max_epochs < 1:
        raise UserInputError(f"trainer.max_epochs must be a whole number >= 1, got {max_epochs!r} "
                             "(nothing would be trained and no checkpoint written)")
    if not isinstance(max_steps, int) or not (max_steps == -1 or max_steps >= 1):
        raise UserInputError(f"trainer.max_steps must be -1 (no limit) or a whole number >= 1, got {max_steps!r}")


def describe_checkpoints(checkpoint_dir: Path) -> str:
    """What is on disk now (only files that exist), for the final message and the error messages."""
    found = []
    if (checkpoint_dir / "best.ckpt").exists():
        found.append(f"{checkpoint_dir / 'best.ckpt'} (weights with the best val ROC-AUC; eval.py --ckpt)")
    if (checkpoint_dir / "last.ckpt").exists():
        found.append(f"{checkpoint_dir / 'last.ckpt'} (to continue: --resume)")
    return "checkpoints: " + ", ".join(found) if found else f"no checkpoint was written in {checkpoint_dir}"


def build_trainer(cfg: DictConfig, loggers: list, callbacks: list, out_dir: Path) -> pl.Trainer:
    with lightning_settings():
        return pl.Trainer(
            accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
            # The last cross layer's vision FFN feeds no loss: DDP must be told some parameters get no gradient.
            strategy=choose_strategy(cfg.trainer, find_unused_parameters=True),
            precision=cfg.trainer.precision, max_epochs=cfg.trainer.max_epochs, max_steps=cfg.trainer.max_steps,
            gradient_clip_val=cfg.optim.grad_clip, accumulate_grad_batches=cfg.optim.accumulate,
            log_every_n_steps=cfg.trainer.log_every_n_steps, logger=loggers, callbacks=callbacks,
            use_distributed_sampler=False, enable_model_summary=False, num_sanity_val_steps=0,
            default_root_dir=str(out_dir),
        )


def run_train(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """`callbacks`: added after the run's own (which write the checkpoints), e.g. to watch or stop a run."""
    data = cfg.data
    train_file = _require(data.train, "training pairs (--train)")
    val_file = _require(data.val, "validation pairs (--val)") if data.val else None
    if not data.features:
        raise UserInputError("no feature files: pass --features TSV_OR_STORE")
    # Globs expanded once (a pattern matching nothing is an error): the run record's fingerprints, config.yaml and
    # the datamodule all name the files.
    features = [_require(str(p), "feature file") for p in expand_feature_paths(list(data.features))]
    data.features = features
    check_run_length(cfg)
    record = run_record(cfg)
    notes: list[str] = []
    resume_point = None
    if cfg.resume:
        resume_point = read_resume_point(resolve_checkpoint(str(cfg.resume)).path)
        notes = check_resume(resume_point, record)
    name = str(cfg.name or f"train_{Path(train_file).stem}")
    out_dir = Path(cfg.out) if cfg.out else REPO_ROOT / "outputs" / name
    checkpoint_dir = out_dir / "checkpoints"
    if not cfg.resume and (checkpoint_dir / "last.ckpt").exists():
        raise UserInputError(f"{checkpoint_dir / 'last.ckpt'} exists: a new run would overwrite that run's checkpoints "
                             f"and mix its logs; continue it with --resume {checkpoint_dir / 'last.ckpt'}, or pass "
                             "another --out")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = TrainingDataModule(
        feature_source=open_feature_source(features), train_pairs=train_file, val_pairs=val_file,
        batch_size=data.batch_size, num_workers=data.num_workers, max_seq_length=data.max_seq_length,
        skip_missing=data.skip_missing, negative_ratio=data.negative_ratio, seed=cfg.seed,
    )
    datamodule.setup("fit")  # bad pairs, missing features or an unlabelled val set: refused before any training

    resolved = resolve_checkpoint(str(cfg.resume or cfg.ckpt))
    model, report = load_lxmert(resolved.path, model_config=cfg.model_config, require=("matching",))
    say(f"{'Resuming' if cfg.resume else 'Starting'} from: {resolved.describe()}\n  {report.summary()}")
    for note in notes:
        say(note)
    model.keep_heads(("matching",))  # the other pretraining heads take no part in fine-tuning
    model.train()  # the loader returns eval mode; Lightning keeps submodule modes as it finds them (dropout!)
    module = MatchingModule(
        model_config=model.config.to_dict(), heads=model.heads, mode="itm", model=model,
        training_settings=TrainingSettings(lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                           warmup_ratio=cfg.optim.warmup_ratio, finetune=cfg.model.finetune,
                                           top_k_cross=cfg.model.top_k_cross, seed=cfg.seed),
    )
    last = ResumeCheckpoint(checkpoint_dir / "last.ckpt", cfg.trainer.checkpoint_every_n_steps, record=record)
    run_callbacks: list = [PairsPerSecondBar(), LearningRateMonitor(logging_interval="step"), last]
    early_stopping = None
    if val_file:
        run_callbacks.append(FiniteValidation())
        # Weights only: best.ckpt is for eval.py and new runs (--ckpt); last.ckpt is the one to resume.
        run_callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor=MONITOR, mode="max",
                                             save_top_k=1, save_last=False, save_weights_only=True,
                                             enable_version_counter=False))
        if cfg.trainer.early_stopping_patience:
            early_stopping = EarlyStopping(monitor=MONITOR, mode="max",
                                           patience=int(cfg.trainer.early_stopping_patience))
            run_callbacks.append(early_stopping)
    loggers = build_loggers(cfg.logger, out_dir, name, OmegaConf.to_container(cfg, resolve=True),
                            resumed_at_step=resume_point.logged_step if resume_point else None)
    trainer = build_trainer(cfg, loggers, [*run_callbacks, *callbacks], out_dir)
    write_atomically(out_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resolved.path) if cfg.resume else None,
                    weights_only=True)
    except NonFiniteValidationError as err:
        raise NonFiniteValidationError(f"{err}; {describe_checkpoints(checkpoint_dir)}") from None
    except SystemExit:
        if trainer.interrupted or trainer.received_sigterm:  # Lightning exits quietly on Ctrl-C / SIGTERM
            raise InterruptedRunError(
                f"training stopped at global step {trainer.global_step}; {describe_checkpoints(checkpoint_dir)}"
            ) from None
        raise
    metrics = (module.results or {}).get("metrics") or {}
    if metrics:
        say(f"Last validation ({int(metrics['num_pairs'])} pairs):\n{metrics_table(metrics)}")
    if early_stopping is not None and early_stopping.stopping_reason_message:
        say(f"Early stopping: {early_stopping.stopping_reason_message}")
    say(f"Trained to global step {trainer.global_step} (epoch {trainer.current_epoch}); "
        f"{describe_checkpoints(checkpoint_dir)}")
    if (checkpoint_dir / "best.ckpt").exists() and trainer.is_global_zero:
        training = TrainingSummary(
            base_checkpoint=describe_checkpoint(resolved), train_pairs=train_file, val_pairs=val_file,
            feature_files=features, epochs=trainer.current_epoch, steps=trainer.global_step, metrics=metrics,
            settings={"lr": cfg.optim.lr, "batch_size": data.batch_size, "finetune": cfg.model.finetune})
        card = card_for_checkpoint(model, ResolvedCheckpoint(checkpoint_dir / "best.ckpt"), training=training,
                                   max_seq_length=data.max_seq_length, command=shlex.join(["train.py", *sys.argv[1:]]))
        say(f"Model card: {write_model_card(checkpoint_dir, card)}")
    return {"out_dir": out_dir, "metrics": metrics, "global_step": trainer.global_step}
