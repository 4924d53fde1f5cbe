#!/usr/bin/env python
"""Reproduce the bundled demo end to end: demo detector, features, tiny LXRT trained by train.py, demo evaluation.

    python scripts/make_demo.py                      # every stage, from data/sample/ (make_sample_data.py's output)
    python scripts/make_demo.py --stages lxrt,train,convert,eval    # some stages only (each reads the last's files)

Stages (each prints its run time):
  detector  a tiny detector (`save_tiny_detector`, pooled width --dim) whose backbone (stem..res4) and res5 get a
            short supervised pre-training on the TRAIN split's ground-truth crops: colour, shape and size
            classification from scenes.json with linear heads that are used only here and then dropped; whole
            images through the backbone, RoI pooling at each box and at jittered copies of it, random flips. The
            detector is NOT trained to detect (its RPN stays random): the demo pools features at the ground-truth
            boxes.
            Written in the HF port's format to checkpoints/demo/frcnn/ (config.yaml + model.safetensors).
  labels    the detector's class and attribute predictors fitted as a SHAPE and a COLOUR classifier on its own pooled
            features of the TRAIN crops (backbone and res5 untouched, so the features do not change), and its
            vocabulary (shapes, colours) written into its config.yaml: the demo's boxes read "red circle 0.98".
  probe     linear probe (logistic regression on the train crops' pooled features, scored on the val crops) of the
            detector's features: colour / shape / colour+shape accuracy.
  features  `extract.py --given-boxes data/sample/boxes.json` for train/val/test -> data/sample/features/<split>_obj.tsv
  lxrt      the initial tiny LXRT (random weights, matching head) as an original-format snapshot + .config.json
  train     `train.py --ckpt <initial> --train captions_train.json --val val_pairs.json ...` (negatives on the fly)
  convert   the best checkpoint of train.py -> weights-only Lightning-format checkpoints/demo/lxrt_demo.ckpt
  eval      `python eval.py` (defaults: one-step on the bundled val pairs) and its accuracy
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # import this checkout's lxmert_pl, installed or not
SAMPLE = REPO / "data" / "sample"
DEMO = REPO / "checkpoints" / "demo"
FEATURES = SAMPLE / "features"
WORK = REPO / "outputs" / "make_demo"  # intermediate files (not bundled)
SPLITS = ("train", "val", "test")
STAGES = ("detector", "labels", "probe", "features", "lxrt", "train", "convert", "eval")

COLORS = ("red", "green", "blue", "yellow", "purple", "white", "orange")
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = ("small", "large")

# The demo detector: the tiny ResNet-50 C4 of lxmert_pl.detector.random_weights, pooled width --dim (= 8 * res2 channels), with
# one class per shape and one attribute per colour (fitted by the `labels` stage; they fill the TSV's object and
# attribute columns and the labels drawn on its boxes) and a strided res5 (7x7 instead of the VG model's dilated
# 14x14: 4x less compute, for a demo that builds in minutes on a CPU).
# Input: the scenes' short side (128-160 px) resized to 256, enough for 16-52 px shapes at the stride-16 res4 map.
DETECTOR_OVERRIDES = {"num_classes": len(SHAPES), "num_attrs": len(COLORS), "res5_halve": True, "min_size_test": 256,
                      "max_size_test": 448}
# A column that must never win (the background class, "no attribute"): its logit sits this far below the others.
NEVER_LOGIT = -30.0

# The tiny LXRT. x_layers >= 2: with one cross layer the vision stream's cross-attention cannot reach the pooled
# [CLS] (the pooler reads the language stream after the last cross layer). No dropout: at this width, from scratch,
# dropout 0.1 keeps the matching loss on its 0.693 plateau for ~25 epochs and ends far lower (val accuracy 0.75 vs 0.9+).
LXRT_CONFIG = {"hidden_size": 48, "num_attention_heads": 4, "intermediate_size": 96, "l_layers": 1, "x_layers": 2,
               "r_layers": 1, "num_qa_labels": 2, "num_object_labels": 16, "num_attr_labels": 8,
               "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# lr 5e-4 with train.py's warm-up + linear decay: 3e-3 (or no warm-up) never leaves the plateau, even on oracle features.
TRAIN_OVERRIDES = ["optim.lr=5e-4", "optim.warmup_ratio=0.05", "optim.weight_decay=0.01", "data.batch_size=32",
                   "data.negative_ratio=0.5", "logger.csv=true", "logger.wandb.mode=disabled", "seed=0"]


def log(msg: str) -> None:
    print(f"[make_demo] {msg}", flush=True)


def shown(path: Path) -> str:
    """A path as the log shows it: relative to the repository when inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def run(cmd: list[str]) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, check=True)


# ----------------------------------------------------------------------------------------------- detector


def crop_labels(split: str) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """Image ids, their ground-truth boxes (R, 4) and labels (R, 3: colour, shape, size) of one split."""
    scenes = json.loads((SAMPLE / "scenes.json").read_text())
    ids, boxes, labels = [], [], []
    for img_id, scene in scenes.items():
        if scene["split"] != split or not scene["objects"]:
            continue
        ids.append(img_id)
        boxes.append(np.array([o["box"] for o in scene["objects"]], np.float32))
        labels.append(np.array([[COLORS.index(o["color"]), SHAPES.index(o["shape"]), SIZES.index(o["size"])]
                                for o in scene["objects"]], np.int64))
    return ids, boxes, labels


def pooled_features(model, blob: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The detector's pooled RoI features (the TSV's features) of given boxes (network pixels), with gradients."""
    features = model.backbone(blob.unsqueeze(0))
    crops = model.roi_head.pool(features, boxes).contiguous()  # NCHW, as the model's convs (see stage_detector)
    return model.roi_head.res5(crops).mean(dim=[2, 3])


def augment(blob: torch.Tensor, boxes: torch.Tensor, copies: int, jitter: float,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random horizontal flip of the network input (every shape is left-right symmetric: labels are unchanged)
    and `copies` versions of each box: the box itself, then boxes whose corners move by up to `jitter` x its size.
    Returns the (maybe flipped) input and the boxes, copy-major: (copies * R, 4)."""
    height, width = blob.shape[-2:]
    if torch.rand(1, generator=generator).item() < 0.5:
        blob = blob.flip(-1)
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    moved = [boxes + (torch.rand(boxes.shape, generator=generator) * 2 - 1) * jitter * size for _ in range(copies - 1)]
    out = torch.cat([boxes, *moved])
    out[:, 0::2] = out[:, 0::2].clamp(0, width - 1)
    out[:, 1::2] = out[:, 1::2].clamp(0, height - 1)
    return blob, out


def stage_detector(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    from lxmert_pl.detector import FrcnnConfig, load_detector, read_image, save_tiny_detector
    from lxmert_pl.detector.loading import CONFIG_NAME, export_port_state_dict

    if args.dim % 8:
        raise SystemExit("--dim must be a multiple of 8 (pooled width = 8 x res2 channels)")
    out = DEMO / "frcnn"
    save_tiny_detector(out, seed=0, res2_out_channels=args.dim // 8, **DETECTOR_OVERRIDES)
    cfg = FrcnnConfig.from_yaml(out / CONFIG_NAME)
    # Trained below: keep its BatchNorms, and NCHW convs (the CPU backward of NHWC ones corrupts memory in PyTorch
    # 2.14: lxmert_pl.detector.backbone.refuse_cpu_channels_last_training). The saved weights are layout-free.
    model, _ = load_detector(out, fuse_batchnorm=False, channels_last=False)
    ids, boxes, labels = crop_labels("train")
    # Preprocess once (the network input of every train image and its boxes in network pixels).
    inputs = []
    for img_id, b in zip(ids, boxes):
        item = model.transform(read_image(SAMPLE / "images" / "train" / f"{img_id}.png"))
        inputs.append((item.tensor, torch.from_numpy(b) * item.scale))
    targets = [torch.from_numpy(lab) for lab in labels]
    heads = torch.nn.ModuleList([torch.nn.Linear(cfg.pooled_dim, n) for n in (len(COLORS), len(SHAPES), len(SIZES))])
    # Trained: every convolution of the backbone (stem..res4) and of res5. The frozen BatchNorms keep their
    # calibrated statistics; the RPN and the box/class/attribute predictors stay random (the demo never uses them).
    trained = list(model.backbone.parameters()) + list(model.roi_head.res5.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": trained, "lr": args.det_lr}, {"params": heads.parameters(), "lr": 1e-2}],
                                  weight_decay=args.det_weight_decay)
    generator = torch.Generator().manual_seed(0)
    steps_per_epoch = (len(inputs) + args.det_batch - 1) // args.det_batch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[args.det_lr, 1e-2],
                                                    total_steps=max(args.det_epochs * steps_per_epoch, 1),
                                                    pct_start=0.1)
    model.train()
    for epoch in range(args.det_epochs):
        start_time = time.perf_counter()
        order = torch.randperm(len(inputs), generator=generator).tolist()
        correct, count, loss_sum = np.zeros(3), 0, 0.0
        for start in range(0, len(order), args.det_batch):
            pooled, target = [], []
            for i in order[start : start + args.det_batch]:
                blob, crop_boxes = augment(*inputs[i], args.det_copies, args.det_jitter, generator)
                pooled.append(pooled_features(model, blob, crop_boxes))
                target.append(targets[i].repeat(args.det_copies, 1))
            pooled, target = torch.cat(pooled), torch.cat(target)
            # The heads see a normalised feature (as LXRT's visual LayerNorm will); the feature itself stays raw.
            normed = torch.nn.functional.layer_norm(pooled, pooled.shape[-1:])
            logits = [head(normed) for head in heads]
            loss = sum(torch.nn.functional.cross_entropy(lg, target[:, k]) for k, lg in enumerate(logits))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(target)
            count += len(target)
            correct += [(lg.argmax(-1) == target[:, k]).sum().item() for k, lg in enumerate(logits)]
        log(f"detector pre-training epoch {epoch + 1}/{args.det_epochs}: loss {loss_sum / count:.3f}, train acc "
            f"colour {correct[0] / count:.3f} shape {correct[1] / count:.3f} size {correct[2] / count:.3f} "
            f"({time.perf_counter() - start_time:.0f} s)")
    model.eval().requires_grad_(False)
    state = export_port_state_dict(model, cfg)
    for old in out.glob("*"):
        if old.name != CONFIG_NAME:
            old.unlink()
    save_file(state, str(out / "model.safetensors"))
    log(f"demo detector written to {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.2f} MB)")


def fit_classifier(x: torch.Tensor, y: torch.Tensor, classes: int, hidden: int | None = None,
                   steps: int = 400) -> torch.nn.Module:
    """A seeded softmax classifier of standardised features: linear, or with one ReLU layer of `hidden` units."""
    torch.manual_seed(0)
    if hidden is None:
        net = torch.nn.Linear(x.shape[1], classes)
    else:
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(),
                                  torch.nn.Linear(hidden, classes))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net.requires_grad_(False)


def stage_labels(args: argparse.Namespace) -> None:
    """Fit the predictors on the detector's pooled features and write them, with the vocabulary, into its folder."""
    import yaml
    from safetensors.torch import load_file, save_file

    from lxmert_pl.detector import FrcnnConfig
    from lxmert_pl.detector.port_format import CONFIG_NAME, OWN_SECTION
    from lxmert_pl.vocab import ATTRIBUTES_KEY, OBJECTS_KEY

    out = DEMO / "frcnn"
    prefix = "roi_heads.box_predictor."
    config = yaml.safe_load((out / CONFIG_NAME).read_text(encoding="utf-8"))
    config["ROI_HEADS"]["NUM_CLASSES"], config["ROI_BOX_HEAD"]["NUM_ATTRS"] = len(SHAPES), len(COLORS)
    section = config.setdefault(OWN_SECTION, {})
    section[OBJECTS_KEY], section[ATTRIBUTES_KEY] = list(SHAPES), list(COLORS)
    (out / CONFIG_NAME).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    cfg = FrcnnConfig.from_yaml(out / CONFIG_NAME)
    # The predictors are sized for one class per shape and one attribute per colour (placeholders until fitted
    # below); every other tensor, the backbone and res5 that make the features, stays as it is.
    state = load_file(str(out / "model.safetensors"))
    embed_dim, hidden = cfg.pooled_dim // 8, cfg.pooled_dim // 4
    state.update({
        prefix + "cls_score.weight": torch.zeros(len(SHAPES) + 1, cfg.pooled_dim),
        prefix + "cls_score.bias": torch.zeros(len(SHAPES) + 1),
        prefix + "cls_embedding.weight": torch.zeros(len(SHAPES) + 1, embed_dim),
        prefix + "fc_attr.weight": torch.zeros(hidden, cfg.pooled_dim + embed_dim),
        prefix + "fc_attr.bias": torch.zeros(hidden),
        prefix + "attr_score.weight": torch.zeros(len(COLORS) + 1, hidden),
        prefix + "attr_score.bias": torch.zeros(len(COLORS) + 1),
        prefix + "bbox_pred.weight": torch.zeros(len(SHAPES) * 4, cfg.pooled_dim),  # never trained (see probe)
        prefix + "bbox_pred.bias": torch.zeros(len(SHAPES) * 4),
    })
    save_file(state, str(out / "model.safetensors"))
    x, y = crop_features("train")
    mean, std = x.mean(0), x.std(0) + 1e-6
    z, y = torch.from_numpy((x - mean) / std), torch.from_numpy(y)
    mean, std = torch.from_numpy(mean), torch.from_numpy(std)
    shape = fit_classifier(z, y[:, 1], len(SHAPES))
    # The attribute branch is Linear(D + E -> H) -> ReLU -> Linear(H -> A + 1) on [feature, embedding of the class]:
    # fitted as a one-hidden-layer colour classifier of the feature alone (a zero class embedding).
    colour = fit_classifier(z, y[:, 0], len(COLORS), hidden=hidden)
    for name, net, target in (("shape", shape, y[:, 1]), ("colour", colour, y[:, 0])):
        log(f"labels: {name} classifier, train accuracy {(net(z).argmax(-1) == target).float().mean():.3f}")

    def fold(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same map on the raw features: W (x - mean) / std + b."""
        return weight / std, bias - (weight * (mean / std)).sum(1)

    cls_w, cls_b = fold(shape.weight, shape.bias)
    attr_w, attr_b = fold(colour[0].weight, colour[0].bias)
    state.update({
        prefix + "cls_score.weight": torch.cat([cls_w, torch.zeros(1, cfg.pooled_dim)]),  # background last, never
        prefix + "cls_score.bias": torch.cat([cls_b, torch.tensor([NEVER_LOGIT])]),
        prefix + "cls_embedding.weight": torch.zeros(len(SHAPES) + 1, embed_dim),
        prefix + "fc_attr.weight": torch.cat([attr_w, torch.zeros(hidden, embed_dim)], dim=1),
        prefix + "fc_attr.bias": attr_b,
        prefix + "attr_score.weight": torch.cat([colour[2].weight, torch.zeros(1, hidden)]),  # "no attribute" last
        prefix + "attr_score.bias": torch.cat([colour[2].bias, torch.tensor([NEVER_LOGIT])]),
    })
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    log(f"labels: shape and colour predictors and their names written to {shown(out)}")
    for split in SPLITS:  # the bundled TSVs, when they exist, get the new labels of their own features
        if (FEATURES / f"{split}_obj.tsv").exists():
            relabel_tsv(split)


def demo_detector_name() -> str:
    """How extraction names the demo detector in the TSVs' sidecars: its registry alias for the bundled one."""
    return "demo-frcnn" if DEMO == REPO / "checkpoints" / "demo" else str(DEMO / "frcnn")


def relabel_tsv(split: str) -> None:
    """Rewrite the object and attribute columns of `<split>_obj.tsv` with the saved detector's predictors applied
    to the file's own features (exactly what extraction feeds them); every other column keeps its bytes."""
    from lxmert_pl.detector import load_detector
    from lxmert_pl.detector.extraction import (boxes_digest, detector_file_digests, extraction_settings,
                                               load_given_boxes)
    from lxmert_pl.detector.selection import OBJ36, object_columns
    from lxmert_pl.features.provenance import write_settings
    from lxmert_pl.features.codec import decode_row, encode_line
    from lxmert_pl.fileio import atomic_writer

    model, report = load_detector(DEMO / "frcnn")
    path = FEATURES / f"{split}_obj.tsv"
    rows = [decode_row(line) for line in path.read_bytes().splitlines() if line.strip()]
    # The provenance sidecar names the detector whose labels the file now holds (the report reads its names).
    given = load_given_boxes(SAMPLE / "boxes.json")
    write_settings(path, extraction_settings(model, demo_detector_name(), detector_file_digests(report), OBJ36,
                                             given, boxes_digest(given)))
    scenes = json.loads((SAMPLE / "scenes.json").read_text())
    right = np.zeros(3)
    with atomic_writer(path, "wb") as handle:
        for row in rows:
            with torch.no_grad():
                cls_logits, attr_logits = model.roi_head.predictor(torch.tensor(row.features))
            object_prob, attr_prob = object_columns(cls_logits.softmax(-1), attr_logits.softmax(-1), False)
            objects_conf, objects_id = object_prob.max(dim=1)
            attrs_conf, attrs_id = attr_prob.max(dim=1)
            row.objects_id, row.objects_conf = objects_id.numpy().astype(np.int64), objects_conf.numpy()
            row.attrs_id, row.attrs_conf = attrs_id.numpy().astype(np.int64), attrs_conf.numpy()
            handle.write(encode_line(row))
            truth = scenes[row.img_id]["objects"]
            if len(truth) == len(row.objects_id):  # given boxes: the scene's objects, in order
                shape_ok = row.objects_id == [SHAPES.index(o["shape"]) for o in truth]
                colour_ok = row.attrs_id == [COLORS.index(o["color"]) for o in truth]
                right += [shape_ok.sum(), colour_ok.sum(), (shape_ok & colour_ok).sum()]
    boxes = sum(len(r.objects_id) for r in rows)
    log(f"labels: {shown(path)} relabelled; against scenes.json: shape {right[0] / boxes:.3f}, colour "
        f"{right[1] / boxes:.3f}, both {right[2] / boxes:.3f} ({boxes} boxes)")


def crop_predictions(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The saved detector's (shape, colour) prediction for each ground-truth crop of a split, and the truth."""
    from lxmert_pl.detector import load_detector

    model, _ = load_detector(DEMO / "frcnn")
    ids, boxes, labels = crop_labels(split)
    predicted = []
    for start in range(0, len(ids), 8):
        paths = [str(SAMPLE / "images" / split / f"{i}.png") for i in ids[start : start + 8]]
        predicted += [np.stack([r.objects_id, r.attrs_id], 1)
                      for r in model.extract(paths, given_boxes=boxes[start : start + 8])]
    return np.concatenate(predicted), np.concatenate(labels)


def crop_features(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features of a split's ground-truth crops, through the saved detector (as the extractor computes them)."""
    from lxmert_pl.detector import load_detector

    model, _ = load_detector(DEMO / "frcnn")
    ids, boxes, labels = crop_labels(split)
    feats = []
    for start in range(0, len(ids), 8):
        paths = [str(SAMPLE / "images" / split / f"{i}.png") for i in ids[start : start + 8]]
        feats += [r.features for r in model.extract(paths, given_boxes=boxes[start : start + 8])]
    return np.concatenate(feats), np.concatenate(labels)


def stage_probe(args: argparse.Namespace) -> dict:
    xtr, ytr = crop_features("train")
    xva, yva = crop_features("val")
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = torch.from_numpy((xtr - mean) / std), torch.from_numpy((xva - mean) / std)
    result = {}
    combo_tr = torch.from_numpy(ytr[:, 0] * len(SHAPES) + ytr[:, 1])
    combo_va = torch.from_numpy(yva[:, 0] * len(SHAPES) + yva[:, 1])
    tasks = {"colour": (torch.from_numpy(ytr[:, 0]), torch.from_numpy(yva[:, 0]), len(COLORS)),
             "shape": (torch.from_numpy(ytr[:, 1]), torch.from_numpy(yva[:, 1]), len(SHAPES)),
             "size": (torch.from_numpy(ytr[:, 2]), torch.from_numpy(yva[:, 2]), len(SIZES)),
             "colour+shape": (combo_tr, combo_va, len(COLORS) * len(SHAPES))}
    for name, (ttr, tva, n) in tasks.items():
        torch.manual_seed(0)
        probe = torch.nn.Linear(xtr.shape[1], n)
        opt = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(probe(xtr), ttr) + 1e-3 * probe.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            result[name] = (probe(xtr).argmax(-1) == ttr).float().mean().item(), \
                (probe(xva).argmax(-1) == tva).float().mean().item()
        log(f"linear probe {name:>12}: train {result[name][0]:.3f}  val {result[name][1]:.3f}")
    predicted, truth = crop_predictions("val")
    shape_ok, colour_ok = predicted[:, 0] == truth[:, 1], predicted[:, 1] == truth[:, 0]
    log(f"detector labels on the val crops: shape {shape_ok.mean():.3f}  colour {colour_ok.mean():.3f}  "
        f"both {(shape_ok & colour_ok).mean():.3f}")
    return result


# ----------------------------------------------------------------------------------------------- features / LXRT


def stage_features(args: argparse.Namespace) -> None:
    FEATURES.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        out = FEATURES / f"{split}_obj.tsv"
        for stale in (out, out.with_name(out.name + ".skipped.txt"), out.with_name(out.name + ".meta.json")):
            stale.unlink(missing_ok=True)
        run([sys.executable, "extract.py", "--images", SAMPLE / "images" / split, "--out", out,
             "--detector", demo_detector_name(), "--given-boxes", SAMPLE / "boxes.json", "--batch-size", "8"])
        log(f"{shown(out)}: {out.stat().st_size / 1e6:.2f} MB")


def stage_lxrt(args: argparse.Namespace) -> Path:
    from lxmert_pl.model import LxmertMatchingModel
    from lxmert_pl.model.config import LxrtConfig

    torch.manual_seed(0)
    config = LxrtConfig(visual_feat_dim=args.dim, **LXRT_CONFIG)
    model = LxmertMatchingModel(config, heads=("matching",))
    # NOTE (lead): width-appropriate init. With BERT's N(0, 0.02) at width 48 the matching loss sits at 0.693 for
    # thousands of steps; with Linear N(0, 1/fan_in) a tiny LXRT learns matching in a few hundred (measured).
    model.init_weights("fan_in")
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / "lxrt_init.pth"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
    path.with_name(path.name + ".config.json").write_text(json.dumps(config.to_dict()))
    log(f"initial tiny LXRT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters -> {path}")
    return path


def stage_train(args: argparse.Namespace) -> None:
    import shutil

    shutil.rmtree(WORK / "train", ignore_errors=True)  # a fresh run (no best-v1.ckpt next to an old best.ckpt)
    run([sys.executable, "train.py", "--ckpt", WORK / "lxrt_init.pth", "--train", SAMPLE / "captions_train.json",
         "--val", SAMPLE / "val_pairs.json", "--features", FEATURES / "train_obj.tsv",
         "--features", FEATURES / "val_obj.tsv", "--out", WORK / "train", "--max-epochs", str(args.epochs),
         "trainer.accelerator=cpu", *TRAIN_OVERRIDES, *args.train_override])


def best_checkpoint() -> Path:
    found = sorted((WORK / "train").rglob("*.ckpt"))
    best = [p for p in found if p.name != "last.ckpt"]
    if not best:
        raise SystemExit(f"no best checkpoint under {WORK / 'train'}: {found}")
    return max(best, key=lambda p: p.stat().st_mtime)


def stage_convert(args: argparse.Namespace) -> None:
    source = best_checkpoint()
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    # Stored in float16 to halve the bundle (90% of it is the BERT-vocabulary word embedding); the loader copies the
    # weights into the fp32 model, and `python eval.py` measures the demo's accuracy with exactly these weights.
    state = {k: v.to(torch.float16).contiguous() for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    hparams = {"model_config": dict(ckpt["hyper_parameters"]["model_config"])}
    out = DEMO / "lxrt_demo.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams}, out)
    log(f"{source} -> {shown(out)} ({out.stat().st_size / 1e6:.2f} MB, weights only, float16)")


def stage_eval(args: argparse.Namespace) -> None:
    out = REPO / "outputs" / "demo_val"
    for name in ("image_features.tsv", "image_features.tsv.meta.json"):  # the one-step cache of an older detector
        (out / name).unlink(missing_ok=True)
    run([sys.executable, "eval.py"])
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    log(f"demo (python eval.py): accuracy {metrics['accuracy']:.4f}, ROC-AUC {metrics.get('roc_auc', float('nan')):.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--dim", type=int, default=64, help="pooled feature width of the demo detector")
    parser.add_argument("--det-epochs", type=int, default=12, help="detector pre-training epochs over the train images")
    parser.add_argument("--det-batch", type=int, default=8, help="images per detector pre-training step")
    parser.add_argument("--det-lr", type=float, default=2e-3, help="peak learning rate (one-cycle schedule)")
    parser.add_argument("--det-weight-decay", type=float, default=1e-4)
    parser.add_argument("--det-copies", type=int, default=4, help="each box and copies-1 jittered versions per step")
    parser.add_argument("--det-jitter", type=float, default=0.15, help="box corners move by up to this x box size")
    parser.add_argument("--epochs", type=int, default=20, help="train.py epochs")
    parser.add_argument("--train-override", action="append", default=[], help="extra key=value for train.py")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    timings = {}
    for stage in STAGES:
        if stage in stages:
            start = time.perf_counter()
            globals()[f"stage_{stage}"](args)
            timings[stage] = time.perf_counter() - start
            log(f"stage {stage}: {timings[stage]:.1f} s")
    log("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {sum(timings.values()):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
