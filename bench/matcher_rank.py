"""`Matcher.rank` (factorized grid) vs element-wise `Matcher.score` on the same image x text grid.

    python bench/matcher_rank.py [--images 64] [--texts 320] [--width 64] [--rounds 3] [--device cpu|cuda]
                                 [--threads N] [--factorize never|auto]

Both calls get the same 64 images (precomputed detections: 10-36 boxes of 2048-d features, so the detector is not
timed; it runs once per image either way, cached) and 320 texts (6-15 random words). `score` gets the grid as 20,480
element-wise pairs (image i repeated for every text, row-major), the way a user without `rank` would write it: it
runs the whole model per pair, 32 pairs per forward (`factorize=never`, its default; `--factorize auto` encodes a
batch's one image once, its 32 texts still once each). `rank` encodes every image and every text once and runs
only the cross layers per pair. The rounds alternate (score, rank / rank, score); the ratio is the median of the
per-round ratios.

Model: the lxr955 layout (9 language, 5 object-relationship, 5 cross-modality layers, 20 tokens, 36 boxes) with
random O(1) weights at `--width` (default 64, for a CPU: lxr955 itself, 768, takes about an hour per round there; the FLOP
ratio does not depend on the width, per-call overheads weigh more at small widths). Expected from
the FLOPs per pair (language 9*20 token-layers, vision 5*36, cross 5*(20+36) with cross-attention):
~1.9x with factorize=never (score's default), ~1.5x with factorize=auto (the image shared within each batch).
Target: >= 1.7x at the documented size (64 x 320, see bench/README.md); exit status 1 when missed there.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import numpy as np
import torch

from lxmert_pl.features.record import ImageFeatures
from lxmert_pl.matcher import Matcher
from lxmert_pl.model import LxmertMatchingModel, get_preset
from lxmert_pl.tokenizer import LxmertTokenizer

TARGET = 1.7
DOCUMENTED = {"images": 64, "texts": 320}
IMAGE_SIZE = 600  # pixels: boxes are drawn inside a 600 x 600 image


def bench_model(width: int, seed: int = 0) -> LxmertMatchingModel:
    """The lxr955 layout at `width`, random weights scaled for O(1) activations, the same for the same seed."""
    config = dataclasses.replace(get_preset("lxr955"), hidden_size=width, num_attention_heads=max(1, width // 64),
                                 intermediate_size=4 * width)
    torch.manual_seed(seed)
    model = LxmertMatchingModel(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "word_embeddings" in name or p.dim() < 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
    return model.eval()


def grid_inputs(num_images: int, num_texts: int, seed: int = 0) -> tuple[list[ImageFeatures], list[str]]:
    g = np.random.default_rng(seed)
    vocab = list(LxmertTokenizer().vocab)[2000:20000]  # ordinary word pieces
    texts = [" ".join(g.choice(g.choice(vocab, 12), g.integers(6, 16))) for _ in range(num_texts)]
    images = []
    for i in range(num_images):
        n = int(g.integers(10, 37))
        code = np.maximum(g.standard_normal(2048), 0) * 2
        xy = g.uniform(0, IMAGE_SIZE / 2, (n, 2))
        boxes = np.concatenate([xy, xy + g.uniform(30, IMAGE_SIZE / 2, (n, 2))], 1).astype(np.float32)
        images.append(ImageFeatures(f"image{i}", IMAGE_SIZE, IMAGE_SIZE, np.zeros(n, np.int64), np.ones(n, np.float32),
                                    np.zeros(n, np.int64), np.ones(n, np.float32), boxes,
                                    np.maximum(code + g.standard_normal((n, 2048)), 0).astype(np.float32)))
    return images, texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=DOCUMENTED["images"])
    parser.add_argument("--texts", type=int, default=DOCUMENTED["texts"])
    parser.add_argument("--width", type=int, default=64, help="hidden width of the lxr955 layout (768 = lxr955)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--factorize", default="never", choices=("never", "auto"), help="score()'s batches")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    images, texts = grid_inputs(args.images, args.texts)
    matcher = Matcher(bench_model(args.width), None, device=args.device, factorize=args.factorize)
    flat_images = [image for image in images for _ in texts]
    flat_texts = texts * len(images)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def timed(call):
        sync()
        start = time.perf_counter()
        out = call()
        sync()
        return time.perf_counter() - start, out

    def run_score():
        return matcher.score(flat_images, flat_texts).reshape(len(images), len(texts))

    def run_rank():
        return matcher.rank(images, texts).scores

    ratios, score_times, rank_times, diff = [], [], [], 0.0
    print(f"{args.images} images x {args.texts} texts = {args.images * args.texts:,} pairs; lxr955 layout at width "
          f"{args.width}; {args.device}, {torch.get_num_threads()} threads; score(factorize={args.factorize})")
    for round_index in range(args.rounds):
        order = (("score", run_score), ("rank", run_rank))
        results = dict((name, timed(call)) for name, call in (order if round_index % 2 == 0 else order[::-1]))
        (t_score, grid_score), (t_rank, grid_rank) = results["score"], results["rank"]
        diff = max(diff, float(np.abs(grid_score - grid_rank).max()))
        ratios.append(t_score / t_rank)
        score_times.append(t_score)
        rank_times.append(t_rank)
        print(f"round {round_index + 1}: score {t_score:.2f} s, rank {t_rank:.2f} s, ratio {ratios[-1]:.2f}x")
    ratio = statistics.median(ratios)
    print(f"median: score {statistics.median(score_times):.2f} s, rank {statistics.median(rank_times):.2f} s; "
          f"rank is {ratio:.2f}x faster (target >= {TARGET}x); max |score - rank| = {diff:.2e}")
    documented = args.images == DOCUMENTED["images"] and args.texts == DOCUMENTED["texts"]
    if diff > 1e-5:
        print("FAIL: rank and score disagree")
        return 1
    if ratio < TARGET:
        print(f"{'FAIL' if documented else 'below target'}: {ratio:.2f}x < {TARGET}x"
              + ("" if documented else " (not the documented size: not a failure)"))
        return 1 if documented else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
