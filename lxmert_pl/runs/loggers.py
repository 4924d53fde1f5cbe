"""Loggers and the progress bar shared by eval and train: CSV always, wandb when configured.

wandb runs offline automatically when no credentials are set (no `WANDB_API_KEY`, no `api.wandb.ai` entry in
~/.netrc), so nothing tries to reach the network unasked; `wandb sync <out>/wandb/offline-run-*` uploads later. With
credentials, the server (`WANDB_BASE_URL`, default https://api.wandb.ai) is probed first with a short TCP connect: when
it cannot be reached the run logs offline and says so, instead of waiting ~100 s for wandb's own time-out.
"""

from __future__ import annotations

import csv
import netrc
import os
import socket
import time
from urllib.parse import urlparse
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from lxmert_pl.errors import UserInputError
from lxmert_pl.fileio import atomic_writer


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(requested: str) -> str:
    if requested not in ("auto", "online", "offline", "disabled"):
        raise UserInputError(f"logger.wandb.mode must be auto|online|offline|disabled, got {requested!r}")
    if requested == "auto":
        return "online" if wandb_has_credentials() else "offline"
    return requested


WANDB_PROBE_TIMEOUT_S = 3.0


def wandb_server_reachable(timeout: float = WANDB_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(reachable, "host:port" or the reason) for the wandb server a run would log to."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host = url.hostname or "api.wandb.ai"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, f"{host}:{port}"
    except OSError as err:
        return False, f"{host}:{port} ({err.strerror or err})"


def build_loggers(
    logger_cfg: Any, out_dir: Path, name: str, config: dict, resumed_at_step: int | None = None
) -> list[Logger]:
    """CSV (unless `logger.csv: false`) and wandb loggers. `resumed_at_step`: the logging step of the checkpoint a
    resumed run continues from; the CSV rows the interrupted run logged before it are kept (`keep_rows_before`)."""
    loggers: list[Logger] = []
    if logger_cfg.get("csv", True):
        csv_logger = CSVLogger(save_dir=str(out_dir), name="csv", version="")
        if resumed_at_step is not None:
            keep_rows_before(csv_logger, resumed_at_step)
        loggers.append(csv_logger)
    wandb_cfg = logger_cfg.get("wandb") or {}
    if wandb_cfg.get("project"):
        mode = wandb_mode(wandb_cfg.get("mode", "auto"))
        if mode == "online":
            reachable, where = wandb_server_reachable()
            if not reachable:
                from lxmert_pl.runs.console import say

                say(f"wandb: cannot reach {where}; logging offline instead "
                    f"(upload later with `wandb sync {out_dir}/wandb/offline-run-*`)")
                mode = "offline"
        if mode != "disabled":
            loggers.append(WandbLogger(project=wandb_cfg.project, entity=wandb_cfg.get("entity"), name=name,
                                       save_dir=str(out_dir), mode=mode, config=config))
    return loggers


@rank_zero_only
def keep_rows_before(logger: CSVLogger, step: int) -> None:
    """Keep the rows of an existing `metrics.csv` logged before `step`, drop the later ones (their steps are trained
    and logged again by the resumed run), and have `logger` append to them.

    Lightning's CSV writer deletes a `metrics.csv` it finds when it starts, which lost every row of the interrupted
    run on `--resume`. The file is moved aside first (never absent while its rows exist only in memory), the kept
    rows are written back under the same header, and then the aside copy is removed.
    """
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        kept = [row for row in reader if row.get("step") and int(float(row["step"])) < step]
    aside = path.with_name(path.name + ".before-resume")
    os.replace(path, aside)
    writer = logger.experiment  # created now, with no metrics.csv to delete
    with atomic_writer(path, "w", encoding="utf-8") as handle:
        rows = csv.DictWriter(handle, fieldnames=header, lineterminator="\r\n")
        rows.writeheader()
        rows.writerows(kept)
    writer.metrics_keys = header  # the header on disk: later rows are appended under it
    aside.unlink()


def wandb_logger(loggers: list[Logger]) -> WandbLogger | None:
    return next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)


class PairsPerSecondBar(TQDMProgressBar):
    """The standard bar, with pairs/s (not batches/s) in its postfix during test, predict and validation."""

    def __init__(self) -> None:
        super().__init__()
        self._start = 0.0
        self._pairs = 0

    def _reset(self) -> None:
        self._start, self._pairs = time.perf_counter(), 0

    def _update(self, bar, batch: dict) -> None:
        self._pairs += len(batch["index"])
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        if bar is not None:
            bar.set_postfix({"pairs/s": f"{self._pairs / elapsed:.1f}"}, refresh=False)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        super().on_test_epoch_start(trainer, pl_module)
        self._reset()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(self.test_progress_bar, batch)
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self._reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(self.val_progress_bar, batch)
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
