"""Factorized vs pairwise scoring of an all-pairs grid at the lxr955 size (16 images x 16 captions by default).

    python bench/factorized_speed.py [--device cpu|cuda] [--threads N] [--images 16] [--captions 16] [--batch 32]
                                     [--repeats 3]

Pairwise: `Scorer.score` on every (image, caption) pair, the whole model per pair. Factorized:
`lxmert_pl.retrieval.Retriever.grid`, the language layers once per caption, the object-relationship layers once per
image, the cross-modality layers and heads per pair. Both run in fp32 with `--batch` pairs per forward, alternately
in one process (the machine is noisy); the script prints the median time of each, the speed-up and the largest
difference between their P(match) grids.

Expected from the FLOPs (20 tokens, 36 boxes): a pair costs ~10.5 GFLOP through the whole model and ~5.3 GFLOP
through the cross layers alone, so a 16 x 16 grid needs ~1.9x fewer FLOPs factorized. Target: >= 1.7x, same scores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bf16_speed import (cross_flops, image_encoder_flops, lxrt_flops, parity_model, structured_inputs,
                        text_encoder_flops)

from lxmert_pl.model import get_preset
from lxmert_pl.retrieval import Retriever
from lxmert_pl.scoring import Scorer
from lxmert_pl.tokenizer import LxmertTokenizer

TARGET_SPEEDUP = 1.7
TOLERANCE = 1e-5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--captions", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32, help="pairs per forward, both ways")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = LxmertTokenizer()
    model = parity_model().to(args.device)
    sentences, features, boxes = structured_inputs(tokenizer, args.images, args.captions, seed=0)
    pairs = [(i, j) for i in range(args.images) for j in range(args.captions)]
    scorer = Scorer(model, tokenizer, device=args.device, batch_size=args.batch)
    retriever = Retriever(model, tokenizer, device=args.device, batch_size=args.batch)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def pairwise() -> torch.Tensor:
        result = scorer.score([sentences[j] for _, j in pairs], [features[i] for i, _ in pairs],
                              [boxes[i] for i, _ in pairs])
        return torch.from_numpy(result.match_prob).view(args.images, args.captions)

    def factorized() -> torch.Tensor:
        return retriever.grid(sentences, features, boxes)

    times: dict[str, list[float]] = {"pairwise": [], "factorized": []}
    grids: dict[str, torch.Tensor] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not timed
        for name, fn in (("pairwise", pairwise), ("factorized", factorized)):
            start = time.perf_counter()
            grids[name] = fn()
            sync()
            if repeat:
                times[name].append(time.perf_counter() - start)

    pairwise_s, factorized_s = statistics.median(times["pairwise"]), statistics.median(times["factorized"])
    speedup = pairwise_s / factorized_s
    diff = float((grids["pairwise"] - grids["factorized"]).abs().max())
    mean_boxes = sum(len(b) for b in boxes) / len(boxes)
    print(f"device {args.device}, threads {torch.get_num_threads()}, lxr955, {args.images} images x "
          f"{args.captions} captions = {len(pairs)} pairs, {mean_boxes:.1f} boxes/image on average, batch "
          f"{args.batch}, fp32, {args.repeats} alternating repeats (median)")
    print(f"pairwise   {pairwise_s:7.2f} s  ({len(pairs) / pairwise_s:6.1f} pairs/s)")
    print(f"factorized {factorized_s:7.2f} s  ({len(pairs) / factorized_s:6.1f} pairs/s)")
    config = get_preset("lxr955")
    factorized_flops = (args.captions * text_encoder_flops(config, 20) + args.images * image_encoder_flops(config, 36)
                        + len(pairs) * cross_flops(config, 20, 36))
    ideal = len(pairs) * lxrt_flops(config, 20, 36) / factorized_flops
    print(f"speed-up {speedup:.2f}x (target >= {TARGET_SPEEDUP}; FLOP ratio at 20 tokens x 36 boxes ~{ideal:.2f}x)")
    print(f"max |P(match) pairwise - factorized| = {diff:.2e} (target <= {TOLERANCE:g}); "
          f"P(match) std over the grid {float(grids['pairwise'].std()):.4f}")
    print("targets met" if speedup >= TARGET_SPEEDUP and diff <= TOLERANCE else "TARGETS NOT MET")


if __name__ == "__main__":
    main()
