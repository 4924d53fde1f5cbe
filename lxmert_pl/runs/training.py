"""The fine-tuning run behind `train.py`: pairs/captions + features -> TrainingDataModule -> MatchingModule.fit.

Checkpoints go to `<out>/checkpoints/`: `best.ckpt` (highest val ROC-AUC) and `last.ckpt` (end of the run, with
optimizer, scheduler, loop progress and data position for an exact `resume=`). Both load directly in
`eval.py --ckpt PATH` and as `train.py --ckpt PATH` (weights only, a new run).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

from lxmert_pl.runs.checkpointing import ResumeCheckpoint
from lxmert_pl.runs.placement import choose_strategy
from lxmert_pl.runs.config import REPO_ROOT
from lxmert_pl.data.train_datamodule import TrainingDataModule
from lxmert_pl.runs.evaluate import say
from lxmert_pl.features.sources import open_feature_source
from lxmert_pl.runs.module import MatchingModule
from lxmert_pl.runs.loggers import PairsPerSecondBar, build_loggers
from lxmert_pl.model.loading import load_lxmert
from lxmert_pl.runs.outputs import metrics_table
from lxmert_pl.registry import ResolvedCheckpoint, resolve_checkpoint
from lxmert_pl.export import TrainingSummary, card_for_checkpoint, write_model_card
from lxmert_pl.export.model_card import describe_checkpoint


def _require(path: str | None, what: str) -> str:
    if not path:
        raise ValueError(f"no {what} given")
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return str(path)


def run_train(cfg: DictConfig) -> dict[str, Any]:
    data = cfg.data
    train_file = _require(data.train, "training pairs (--train)")
    val_file = _require(data.val, "validation pairs (--val)") if data.val else None
    if not data.features:
        raise ValueError("no feature files: pass --features TSV_OR_STORE")
    features = [_require(p, "feature file") for p in data.features]
    name = str(cfg.name or f"train_{Path(train_file).stem}")
    out_dir = Path(cfg.out) if cfg.out else REPO_ROOT / "outputs" / name
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    start = cfg.resume or cfg.ckpt
    resolved = resolve_checkpoint(str(start))
    model, report = load_lxmert(resolved.path, model_config=cfg.model_config, require=("matching",))
    say(f"{'Resuming' if cfg.resume else 'Starting'} from: {resolved.describe()}\n  {report.summary()}")
    model.keep_heads(("matching",))  # the other pretraining heads take no part in fine-tuning
    model.train()  # the loader returns eval mode; Lightning keeps submodule modes as it finds them (dropout!)

    datamodule = TrainingDataModule(
        feature_source=open_feature_source(features), train_pairs=train_file, val_pairs=val_file,
        batch_size=data.batch_size, num_workers=data.num_workers, max_seq_length=data.max_seq_length,
        skip_missing=data.skip_missing, negative_ratio=data.negative_ratio, seed=cfg.seed,
    )
    module = MatchingModule(
        model_config=model.config.to_dict(), heads=model.heads, mode="itm", lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay, warmup_ratio=cfg.optim.warmup_ratio, finetune=cfg.model.finetune,
        top_k_cross=cfg.model.top_k_cross, seed=cfg.seed, model=model,
    )
    checkpoint_dir = out_dir / "checkpoints"
    last = ResumeCheckpoint(checkpoint_dir / "last.ckpt", cfg.trainer.checkpoint_every_n_steps)
    callbacks: list = [PairsPerSecondBar(), LearningRateMonitor(logging_interval="step"), last]
    if val_file:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor="val/roc_auc", mode="max",
                                         save_top_k=1, save_last=False, enable_version_counter=False))
        if cfg.trainer.early_stopping_patience:
            callbacks.append(EarlyStopping(monitor="val/roc_auc", mode="max",
                                           patience=int(cfg.trainer.early_stopping_patience)))
    loggers = build_loggers(cfg.logger, out_dir, name, OmegaConf.to_container(cfg, resolve=True))
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
        # The last cross layer's vision FFN feeds no loss: DDP must be told some parameters get no gradient.
        strategy=choose_strategy(cfg.trainer, find_unused_parameters=True),
        precision=cfg.trainer.precision, max_epochs=cfg.trainer.max_epochs, max_steps=cfg.trainer.max_steps,
        gradient_clip_val=cfg.optim.grad_clip, accumulate_grad_batches=cfg.optim.accumulate,
        log_every_n_steps=cfg.trainer.log_every_n_steps, logger=loggers, callbacks=callbacks,
        use_distributed_sampler=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    OmegaConf.save(cfg, out_dir / "config.yaml")
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resolved.path) if cfg.resume else None,
                weights_only=True)
    metrics = (module.results or {}).get("metrics") or {}
    if metrics:
        say(f"Last validation ({int(metrics['num_pairs'])} pairs):\n{metrics_table(metrics)}")
    say(f"Checkpoints: {checkpoint_dir} (best.ckpt by val ROC-AUC, last.ckpt for resume=)")
    if (checkpoint_dir / "best.ckpt").exists() and trainer.is_global_zero:
        training = TrainingSummary(
            base_checkpoint=describe_checkpoint(resolved), train_pairs=train_file, val_pairs=val_file,
            feature_files=features, epochs=trainer.current_epoch, steps=trainer.global_step, metrics=metrics,
            settings={"lr": cfg.optim.lr, "batch_size": data.batch_size, "finetune": cfg.model.finetune})
        card = card_for_checkpoint(model, ResolvedCheckpoint(checkpoint_dir / "best.ckpt"), training=training,
                                   max_seq_length=data.max_seq_length, command=shlex.join(["train.py", *sys.argv[1:]]))
        say(f"Model card: {write_model_card(checkpoint_dir, card)}")
    return {"out_dir": out_dir, "metrics": metrics, "global_step": trainer.global_step}
