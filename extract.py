#!/usr/bin/env python
"""Extract bottom-up-attention features of images into an obj36-format TSV (resumable, shardable).

    python extract.py --images DIR_OR_LISTFILE --out FILE.tsv --detector frcnn-vg-finetuned
                      [--boxes 36 | --min-boxes 10 --max-boxes 100] [--given-boxes BOXES.json]
                      [--batch-size N] [--accelerator cpu|gpu] [--devices N] [--geometry port|caffe]
                      [--precision fp32|bf16] [key=value ...]

DIR: the image files directly in it; LISTFILE: one image path per line (relative to the list file). The row id is the
file name without its extension. The detector is an alias of checkpoints/registry.yaml (`frcnn-vg-finetuned`,
downloaded on first use; `demo-frcnn`, bundled) or a directory in the HF port's format (`config.yaml` +
`pytorch_model.bin` or `*.safetensors`), or an original bottom-up-attention `.caffemodel` (`frcnn-caffe-36`:
LXMERT's obj36 extraction; `--detector-config` for another architecture than the real one; always the caffe
geometry). Rerunning the same command after an interruption extracts only what is missing. Unreadable images are
skipped and listed in `<out>.skipped.txt`. With `--given-boxes` (`{img_id: [[x1, y1, x2, y2], ...]}`, original
pixels) the features of those boxes are extracted instead of detected ones, and images without an entry are skipped.
`--geometry` picks the proposal layer: `caffe` (the original bottom-up-attention one, the registry's default for
frcnn-vg-finetuned) or `port` (the HF port's; the default for demo-frcnn and for detector directories); the run
prints the one it used. `--precision bf16` runs the detector's RoI head (res5, ~92% of its compute) in bfloat16:
faster on CPUs with AVX-512 bf16 / AMX and on GPU tensor cores; proposals and outputs stay float32 (bench/README.md).
The settings are recorded in `<out>.meta.json`: a rerun with other settings, a second run on the same --out, or an
--out that is not a feature TSV is refused (docs/reliability.md). Config: configs/extract.yaml.
"""

from __future__ import annotations

import sys

from lxmert_pl.detector.geometry import GEOMETRIES
from lxmert_pl.errors import ConfigError
from lxmert_pl.runs.cli import ACCELERATOR, DEVICES, NUM_NODES, Command, Flag, positive_int

FLAGS = [
    Flag("--images", "images", "image folder or list file"),
    Flag("--out", "out", "output TSV (resumed when it exists)"),
    Flag("--detector", "detector.ckpt", "registry alias (frcnn-vg-finetuned, frcnn-caffe-36, demo-frcnn), directory, weights file or .caffemodel"),
    Flag("--detector-config", "detector.config", "config.yaml, if not next to the weights"),
    Flag("--boxes", None, "fixed number of boxes per image (default 36; sets min and max)", type=positive_int),
    Flag("--min-boxes", "detector.min_boxes", "adaptive: at least this many boxes (10)", type=positive_int),
    Flag("--max-boxes", "detector.max_boxes", "adaptive: at most this many boxes (100)", type=positive_int),
    Flag("--given-boxes", "given_boxes", "JSON {img_id: [[x1, y1, x2, y2], ...]}: pool these boxes"),
    Flag("--batch-size", "detector.batch_size", "images per forward pass", type=positive_int),
    Flag("--precision", "detector.precision", "RoI head precision (bf16: faster, features within cosine 0.9999 of fp32)",
         choices=("fp32", "bf16")),
    Flag("--geometry", "detector.geometry", "proposal geometry (default: the registry's for an alias, else port)",
         choices=GEOMETRIES),
    Flag("--show", "show", "draw the first N extracted images with their labelled boxes to <out>.show/*.png",
         type=int),
    ACCELERATOR, DEVICES, NUM_NODES,
]


def derive(namespace, values: dict) -> None:
    """--boxes N is min = max = N; --min-boxes alone means adaptive 10-100 defaults for the other bound."""
    adaptive = "detector.min_boxes" in values or "detector.max_boxes" in values
    if namespace.boxes is not None:
        if adaptive:
            raise ConfigError("use either --boxes N or --min-boxes/--max-boxes")
        values["detector.min_boxes"] = values["detector.max_boxes"] = namespace.boxes
    elif adaptive:
        values.setdefault("detector.min_boxes", 10)
        values.setdefault("detector.max_boxes", 100)


COMMAND = Command("extract.py", __doc__, "extract", FLAGS, adjust=derive)


def run(cfg) -> None:
    from lxmert_pl.runs.extraction import run_extract  # imported after parsing: --help answers at once

    run_extract(cfg)


def main(argv: list[str] | None = None) -> int:
    return COMMAND.main(run, argv)

if __name__ == "__main__":
    sys.exit(main())
