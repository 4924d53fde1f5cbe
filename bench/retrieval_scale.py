"""Retrieval cost at the lxr955 size (random weights): N images x 5N captions, full pairwise vs factorized vs top-k.

    python bench/retrieval_scale.py [--sizes 4 8] [--k-fraction 0.128] [--precision fp32 bf16] [--device cpu]
                                    [--threads N] [--batch 32]

For each N the script scores the same grid (5 captions per image, as Flickr30k/COCO) with `lxmert_pl.retrieval.
Retriever` in one process:

* pairwise: the whole model per pair (`Retriever(factorize=False)`, which encodes nothing else), N x 5N pairs;
* factorized: the language layers once per caption, the object-relationship layers once per image, the cross layers
  per pair (the full grid);
* top-k: the first stage (no cross layers) keeps the top k = ceil(k_fraction x N) captions per image and images per
  caption; the cross layers score their union (k_fraction 0.128 = LAVIS's k_test 128 over Flickr30k's 1,000 images).

The methods run in turn, `--rounds` times. It prints the median wall time, pairs/s, FLOPs (matmul FLOPs at 20 tokens
x 36 boxes, counted as in bf16_speed.py; the FLOP ratio is the bound a time ratio can reach) and the median of
per-round time ratios to pairwise, per precision. The machine is shared and noisy: read the ratios and how they
grow with N. No targets: exit 0.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time

import torch

from bf16_speed import (cross_flops, image_encoder_flops, lxrt_flops, parity_model, structured_inputs,
                        text_encoder_flops)

from lxmert_pl.model import get_preset
from lxmert_pl.retrieval import Retriever
from lxmert_pl.tokenizer import LxmertTokenizer

TOKENS, BOXES = 20, 36


def flops(kind: str, num_images: int, num_captions: int, pairs: int) -> float:
    """Matmul FLOPs of one run: pairwise = every pair through the whole model; factorized / top-k = each caption
    and image encoded once, the cross layers per scored pair (the first stage's cosines are negligible)."""
    config = get_preset("lxr955")
    if kind == "pairwise":
        return pairs * lxrt_flops(config, TOKENS, BOXES)
    return (num_captions * text_encoder_flops(config, TOKENS) + num_images * image_encoder_flops(config, BOXES)
            + pairs * cross_flops(config, TOKENS, BOXES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8], help="numbers of images N (5N captions)")
    parser.add_argument("--k-fraction", type=float, default=0.128, help="k = ceil(fraction x N)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32, help="pairs per cross forward, captions/images per encoder")
    parser.add_argument("--skip-pairwise", action="store_true", help="factorized and top-k only (large N)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per N (medians reported)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = LxmertTokenizer()
    base = parity_model()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"lxr955 random weights, device {args.device}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.rounds} alternating rounds (time x: median of per-round ratios to the first method); FLOPs at "
          f"{TOKENS} tokens x {BOXES} boxes; load average {os.getloadavg()[0]:.1f}")
    print(f"{'prec':5} {'N':>4} {'M':>5} {'method':11} {'pairs':>7} {'seconds':>8} {'pairs/s':>8} {'GFLOP':>9} "
          f"{'time x':>7} {'FLOP x':>7}")
    for precision in args.precision:
        model = copy.deepcopy(base)
        for n in args.sizes:
            m = 5 * n
            sentences, features, boxes = structured_inputs(tokenizer, n, m, seed=n)
            k = max(1, math.ceil(args.k_fraction * n))
            runs = [("factorized", True, None), (f"top-{k}", True, k)]
            if not args.skip_pairwise:
                runs.insert(0, ("pairwise", False, None))
            Retriever(model, tokenizer, device=args.device, precision=precision, batch_size=args.batch).grid(
                sentences[:2], features[:1], boxes[:1])  # warm-up (and the one in-place cast)
            retrievers = {name: (Retriever(model, tokenizer, device=args.device, precision=precision,
                                           batch_size=args.batch, factorize=factorize), kk)
                          for name, factorize, kk in runs}
            times: dict[str, list[float]] = {name: [] for name in retrievers}
            scored: dict[str, int] = {}
            for _ in range(args.rounds):  # alternating rounds: every method shares the machine's noise
                for name, (retriever, kk) in retrievers.items():
                    start = time.perf_counter()
                    result = retriever.rerank(sentences, features, boxes, kk)
                    sync()
                    times[name].append(time.perf_counter() - start)
                    scored[name] = result.num_pairs_scored
            first = next(iter(retrievers))
            base_flop = flops("pairwise" if first == "pairwise" else "factorized", n, m, scored[first])
            for name in retrievers:
                seconds = statistics.median(times[name])
                kind = "pairwise" if name == "pairwise" else "factorized"
                gflop = flops(kind, n, m, scored[name]) / 1e9
                ratio = statistics.median(b / t for b, t in zip(times[first], times[name]))
                print(f"{precision:5} {n:4d} {m:5d} {name:11} {scored[name]:7d} {seconds:8.2f} "
                      f"{scored[name] / seconds:8.1f} {gflop:9.1f} {ratio:6.2f}x {base_flop / 1e9 / gflop:6.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
