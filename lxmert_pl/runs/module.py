"""The LightningModule: LXRT + heads for evaluation (test/predict) and fine-tuning (fit).

Scores per pair: `itm` = P(matched) = softmax(matching logits)[:, 1] (logit index 1 means "matched"), or `cosine` =
max over boxes of cos(vision output, pooled output). Evaluation collects per batch what the metrics need, all of it
carried by the batch (pair index, score, label, img_id, sentence); at the end of the epoch every process's results
are gathered (each pair was seen by exactly one process — see `lxmert_pl.data.sampler`), checked for duplicates and
holes, ordered by pair index, and the metrics are computed on the whole set. Training (settings: `TrainingSettings`)
minimises cross-entropy on the matching logits with target 1 for matched pairs.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lxmert_pl.errors import UserInputError
from lxmert_pl.metrics import matching_metrics
from lxmert_pl.model.config import LxrtConfig
from lxmert_pl.model.heads import LxmertMatchingModel
from lxmert_pl.scoring import SCORE_MODES, forward_batch

# Lightning 2.6's own batch flattening calls torch's deprecated `LeafSpec()`: a warning about library internals that
# every eval/train run would print and the user cannot act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

DEFAULT_THRESHOLDS = {"itm": 0.5, "cosine": 0.0}
FINETUNE_CHOICES = ("all", "head", "top-k")


@dataclass(frozen=True)
class TrainingSettings:
    """What fine-tuning (`fit`) needs beyond the model: optimiser, schedule, which parameters train, dropout seed.

    `lr`: AdamW peak rate; `weight_decay`: not applied to biases and LayerNorms; `warmup_ratio`: linear warm-up over
    this fraction of the steps, then linear decay to 0 (BertAdam's schedule); `finetune`: all | head | top-k (see
    `MatchingModule.apply_finetune_mode`); `top_k_cross`: cross layers trained with `top-k`; `seed`: dropout seed.
    """

    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    finetune: str = "all"
    top_k_cross: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.finetune not in FINETUNE_CHOICES:
            raise UserInputError(f"model.finetune must be one of {FINETUNE_CHOICES}, got {self.finetune!r}")


class MatchingModule(pl.LightningModule):
    def __init__(
        self,
        model_config: dict[str, Any],
        heads: tuple[str, ...] | list[str] = ("matching",),
        mode: str = "itm",
        threshold: float | None = None,
        factorize: str = "auto",
        training_settings: TrainingSettings | dict[str, Any] | None = None,
        model: LxmertMatchingModel | None = None,
    ):
        """`mode`, `threshold`, `factorize`: how pairs are scored (evaluation and validation). `training_settings`: the
        settings `fit` needs (None for evaluation only; a dict is accepted as saved in a checkpoint's
        hyper-parameters). `model`: an already loaded model (its config/heads must match); otherwise a fresh one is
        built (its weights then come from a Lightning checkpoint)."""
        super().__init__()
        if mode not in SCORE_MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {SCORE_MODES}")
        if isinstance(training_settings, dict):
            training_settings = TrainingSettings(**training_settings)
        self._training_settings = training_settings
        # Plain types only: checkpoints are read back with torch.load(weights_only=True) (eval.py, --resume).
        settings = asdict(training_settings) if training_settings is not None else None
        self.save_hyperparameters({"model_config": dict(model_config), "heads": list(heads), "mode": mode,
                                   "threshold": threshold, "factorize": factorize, "training_settings": settings})
        self.model = model if model is not None else LxmertMatchingModel(LxrtConfig.from_dict(model_config), tuple(heads))
        if mode == "itm" and not self.model.has_matching_head:
            raise ValueError("mode 'itm' needs a matching head (cls.seq_relationship); this model has none: "
                             "use mode 'cosine'")
        self.mode = mode
        self.threshold = DEFAULT_THRESHOLDS[mode] if threshold is None else float(threshold)
        self.factorize = factorize
        self._outputs: list[dict[str, Any]] = []
        self.results: dict[str, Any] | None = None  # set at the end of test/validation: predictions + metrics

    @property
    def training_settings(self) -> TrainingSettings:
        """The settings `fit` needs; training a module built without them is a programming error."""
        if self._training_settings is None:
            raise RuntimeError("MatchingModule was built without TrainingSettings: it can evaluate, not train")
        return self._training_settings

    # ------------------------------------------------------------------------------------------------ scoring
    def score_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        out = forward_batch(self.model, batch, self.factorize, scores=SCORE_MODES)
        score = out.match_prob if self.mode == "itm" else out.cosine
        row = {"index": batch["index"], "score": score.float(), "label": batch["labels"], "cosine": out.cosine.float()}
        if out.match_logits is not None:
            row["logits"] = out.match_logits.float()
        return row

    def _collect(self, batch: dict) -> None:
        """Scores, plus each pair's img_id and sentence (the retrieval metrics group by them)."""
        row: dict[str, Any] = {k: v.detach().cpu() for k, v in self.score_batch(batch).items()}
        row.update(img_id=list(batch["img_id"]), sent=list(batch["sent"]))
        self._outputs.append(row)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._collect(batch)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.score_batch(batch).items()}

    def on_test_epoch_start(self) -> None:
        self._outputs = []

    def on_test_epoch_end(self) -> None:
        self.results = self._finish("test")

    # ----------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labels = batch["labels"]
        if (labels < 0).any():
            raise ValueError("training pairs need labels (1 = matched, 0 = not matched)")
        # Dropout draws from a generator seeded by (seed, step, rank): a resumed run repeats an uninterrupted one.
        torch.manual_seed(self.training_settings.seed * 1_000_003 + self.global_step * 1009 + self.global_rank)
        out = forward_batch(self.model, batch, "never")
        # Target index 1 = "matched", index 0 = "not matched" (the pretraining convention).
        loss = F.cross_entropy(out.match_logits.float(), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._collect(batch)

    def on_validation_epoch_start(self) -> None:
        self._outputs = []

    def on_validation_epoch_end(self) -> None:
        results = self._finish("val")
        if results is not None and results["metrics"]:
            for name in ("roc_auc", "accuracy", "f1", "average_precision"):
                value = results["metrics"].get(name)
                if value is not None:
                    self.log(f"val/{name}", value, rank_zero_only=False, sync_dist=False)
        self.results = results

    def configure_optimizers(self):
        self.apply_finetune_mode()
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]  # biases and LayerNorms, as BertAdam's users set it
        settings = self.training_settings
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=settings.lr,
        )
        total = max(1, self.schedule_steps())
        warmup = max(1, int(settings.warmup_ratio * total))

        def warmup_linear(step: int) -> float:  # BertAdam's schedule: linear warm-up, then linear decay to 0
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """Set each group's rate from the schedule at the current step. A fresh or exactly resumed run gets the
        value it already has; a run resumed with another `max_epochs` (another schedule length, see
        `lxmert_pl.runs.checkpointing.check_resume`) gets the new schedule's rate from its first step on, instead
        of the old schedule's rate restored with the optimizer."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                step = scheduler.last_epoch
                for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                                  scheduler.lr_lambdas):
                    group["lr"] = base_lr * factor(step)

    def schedule_steps(self) -> int:
        """Optimizer steps the LR schedule spans: all of `max_epochs` (so `max_steps`, which only stops a run early,
        does not change the schedule: a run stopped at step N and resumed follows the uninterrupted one)."""
        trainer = self.trainer
        batches = getattr(trainer.datamodule, "batches_per_epoch", None) if trainer.datamodule is not None else None
        if batches is None or trainer.max_epochs is None or trainer.max_epochs < 0:
            return int(trainer.estimated_stepping_batches)
        return -(-batches() * trainer.max_epochs // trainer.accumulate_grad_batches)

    def apply_finetune_mode(self) -> None:
        """`all`: everything trains; `head`: the matching head and pooler; `top-k`: plus the last k cross layers."""
        finetune = self.training_settings.finetune
        if not self.model.has_matching_head:
            raise ValueError("fine-tuning needs a matching head (cls.seq_relationship)")
        for p in self.model.parameters():
            p.requires_grad = finetune == "all"
        if finetune == "all":
            return
        trainable = [self.model.cls.seq_relationship, self.model.bert.pooler]
        if finetune == "top-k":
            trainable += list(self.model.bert.encoder.x_layers)[-self.training_settings.top_k_cross :]
        for module in trainable:
            for p in module.parameters():
                p.requires_grad = True

    # ------------------------------------------------------------------------------------------- gathering
    def _finish(self, stage: str) -> dict[str, Any] | None:
        local = _concat(self._outputs)
        self._outputs = []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
            local = _concat([p for p in parts if p])
        if not local:
            return None
        order = torch.argsort(local["index"])
        merged = {k: v[order] if isinstance(v, torch.Tensor) else [v[i] for i in order.tolist()]
                  for k, v in local.items()}
        index = merged["index"]
        if len(index) > 1 and bool((index[1:] == index[:-1]).any()):
            dupes = sorted({int(i) for i in index[1:][index[1:] == index[:-1]]})
            raise RuntimeError(f"{stage}: {len(dupes)} pairs were scored twice after gathering the processes' "
                               f"results (pair indices {dupes[:10]}; {len(index)} scores in all)")
        metrics: dict[str, float] = {}
        labelled = merged["label"] >= 0
        if self._trainer is not None and self.trainer.sanity_checking:
            return {"stage": stage, **merged, "metrics": metrics}
        # Non-finite scores (NaN/inf features, a diverged model) would still give plausible-looking metrics (ties):
        # they are left out of the metrics and reported by index; the run decides whether that is an error.
        finite = torch.isfinite(merged["score"])
        nonfinite = index[~finite].tolist()
        usable = labelled & finite
        if bool(usable.any()):
            keep = usable.nonzero().flatten().tolist()
            metrics = matching_metrics(
                merged["score"][usable], merged["label"][usable],
                [merged["img_id"][i] for i in keep], [merged["sent"][i] for i in keep], self.threshold,
            )
        return {"stage": stage, **merged, "metrics": metrics, "nonfinite": nonfinite}


def _concat(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows of tensors and lists (img_id, sent) -> one tensor or list per key present in every row."""
    if not rows:
        return {}
    keys = set.intersection(*(set(r) for r in rows))
    return {k: torch.cat([r[k] for r in rows]) if isinstance(rows[0][k], torch.Tensor) else
            [item for r in rows for item in r[k]] for k in keys}
