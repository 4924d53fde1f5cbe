"""Pairs/s of lxmert_pl's LXRT vs transformers' LXMERT at the lxr955 size, same random weights, same batch.

    python bench/model_throughput.py [--batch 32] [--tokens 20] [--boxes 36] [--repeats 5]

Both models are timed alternately in the same process (the machine is noisy); the script prints the median
pairs/s of each and their ratio. Target (issue 2): ratio >= 1.0 in fp32 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def make_inputs(batch: int, tokens: int, boxes: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, tokens), generator=g)
    ids[:, 0] = 101
    mask = torch.ones(batch, tokens, dtype=torch.long)
    feats = torch.relu(torch.randn(batch, boxes, 2048, generator=g))
    xy = torch.rand(batch, boxes, 2, generator=g) * 0.5
    pos = torch.cat([xy, xy + 0.4 * torch.rand(batch, boxes, 2, generator=g)], -1)
    return {"input_ids": ids, "attention_mask": mask, "features": feats, "boxes": pos}


def build_models(device: str):
    import transformers

    from lxmert_pl.model import get_preset
    from lxmert_pl.model.loading import load_lxmert, save_hf_directory  # noqa: F401

    config = get_preset("lxr955")
    torch.manual_seed(0)
    hf = transformers.LxmertForPreTraining(transformers.LxmertConfig(**config.to_dict())).eval().to(device)
    from lxmert_pl.model.heads import LxmertMatchingModel

    ours = LxmertMatchingModel(config).eval()
    state = {("bert." + k[len("lxmert."):] if k.startswith("lxmert.") else k): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return hf, ours.to(device)


def time_call(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--boxes", type=int, default=36)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    hf, ours = build_models(args.device)
    x = {k: v.to(args.device) for k, v in make_inputs(args.batch, args.tokens, args.boxes).items()}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    @torch.inference_mode()
    def run_hf():
        hf(input_ids=x["input_ids"], attention_mask=x["attention_mask"], visual_feats=x["features"],
           visual_pos=x["boxes"])
        sync()

    @torch.inference_mode()
    def run_hf_backbone():  # transformers without its LM/object heads: backbone + matching head only
        out = hf.lxmert(input_ids=x["input_ids"], attention_mask=x["attention_mask"], visual_feats=x["features"],
                        visual_pos=x["boxes"])
        hf.cls.seq_relationship(out.pooled_output)
        sync()

    @torch.inference_mode()
    def run_ours():
        ours(x["input_ids"], x["attention_mask"], x["features"], x["boxes"])
        sync()

    with torch.inference_mode():  # same weights, same numbers
        a = hf(input_ids=x["input_ids"], attention_mask=x["attention_mask"], visual_feats=x["features"],
               visual_pos=x["boxes"]).cross_relationship_score
        b = ours(x["input_ids"], x["attention_mask"], x["features"], x["boxes"]).match_logits
    print(f"max |logit diff| ours vs transformers: {float((a - b).abs().max()):.2e}")

    hf_times, backbone_times, our_times = [], [], []
    for _ in range(args.repeats):  # alternate to share the machine's noise
        hf_times += time_call(run_hf, 1, warmup=0 if hf_times else 1)
        backbone_times += time_call(run_hf_backbone, 1, warmup=0 if backbone_times else 1)
        our_times += time_call(run_ours, 1, warmup=0 if our_times else 1)
    hf_rate = args.batch / statistics.median(hf_times)
    backbone_rate = args.batch / statistics.median(backbone_times)
    our_rate = args.batch / statistics.median(our_times)
    print(f"device {args.device}, threads {torch.get_num_threads()}, batch {args.batch}, tokens {args.tokens}, "
          f"boxes {args.boxes}, fp32, {args.repeats} repeats (median)")
    print(f"transformers LxmertForPreTraining: {hf_rate:8.1f} pairs/s")
    print(f"transformers LxmertModel + matching head only: {backbone_rate:8.1f} pairs/s")
    print(f"lxmert_pl LxmertMatchingModel:     {our_rate:8.1f} pairs/s")
    print(f"ratio (ours / transformers LxmertForPreTraining): {our_rate / hf_rate:.2f}x  (target >= 1.0)")
    print(f"ratio (ours / transformers backbone + matching head): {our_rate / backbone_rate:.2f}x")


if __name__ == "__main__":
    main()
