"""Loading the ORIGINAL caffe bottom-up-attention weights (`.caffemodel`) into `BottomUpFasterRCNN`.

The research fork extracted LXMERT's obj36 features in caffe with `resnet101_faster_rcnn_final_iter_320000.caffemodel`
(36 boxes) and `resnet101_faster_rcnn_final.caffemodel` (10-100 boxes), peteanderson80/bottom-up-attention. Reading
those files directly avoids the HF conversion's unknowns: the original network runs with the original proposal
layer (`geometry="caffe"`, always: the port's anchors and decoding would not be the original network).

How the file is read (`read_caffemodel`): a `.caffemodel` is a caffe `NetParameter` protobuf, parsed by the protobuf
library with the message classes of `caffe_proto` (upb's `ParseFromString` has no size limit: a 270 MB file parses
in about half a second; the real files are ~262 MB of float32). The raw bytes are dropped once parsed and the
message once its blobs are numpy arrays, so the peak is about twice the file size.

How the layers map (`caffe_layer_map`): every parameterised layer of the original `test.prototxt` is listed
explicitly with its caffe type and the HF port's checkpoint key it fills, so the result is a port-layout state dict
(`port_key` names) that the rest of the detector code uses unchanged:

* Convolution: weight [out, in, kh, kw] (+ bias for the RPN convs).
* BatchNorm: blobs mean·f, var·f, f (caffe's moving-average factor) -> running_mean / running_var = blob · (1/f),
  with f = 0 giving 0 as in caffe's `batch_norm_layer.cpp`. Scale: γ, β -> the norm's weight and bias.
* `rpn_cls_score` [2A, H, 1, 1]: channels 0..A-1 are background, A..2A-1 foreground (caffe's Reshape(0, 2, -1, 0)
  pairs channel a with a + A). The port's single objectness logit is fg - bg, which gives exactly the 2-channel
  softmax's foreground probability as softmax(0, logit). Anchor order: caffe's a_c = r·S + s (ratios outer, sizes
  inner) -> the port's a_p = s·R + r; `rpn_bbox_pred` rows 4·a_c + k -> 4·a_p + k.
* `cls_score`, `cls_embedding` (Embed, [K+1, E]), `attr_score`: background / "no attribute" is caffe's FIRST row and
  the port's LAST: rows [1..K, 0].
* `bbox_pred` [4(K+1), D]: a caffe snapshot stores un-normalised regression (× BBOX_NORMALIZE_STDS); in the port's
  layout the background rows are dropped and the rest multiplied by the port's (10, 10, 5, 5). Extraction never
  uses it (obj36 boxes are proposals); it is kept in the state dict (and written by `convert`) for analysis.

Layer names: `conv1`, `bn_conv1`, `scale_conv1`; per block `res{S}{b}_branch{1,2a,2b,2c}`, `bn{S}{b}_...`,
`scale{S}{b}_...`. Block letters follow KaimingHe's deploy prototxts: ResNet-50 uses letters in every stage, ResNet-101
/ 152 use `a, b1, b2, ...` in res3 and res4 (res2 and res5 keep letters). The architecture is the built-in
`CAFFE_RESNET101` preset (the real models) unless a port-format `config.yaml` is given.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from google.protobuf.message import DecodeError

from ..errors import CheckpointError, UserInputError
from ..fileio import atomic_path
from .caffe_proto import V1_LAYER_TYPES, NetParameter
from .config import FrcnnConfig
from .geometry import CAFFE, check_geometry
from .model import BottomUpFasterRCNN, build_detector
from .port_format import (
    CONFIG_NAME,
    DetectorLoadReport,
    abbreviate,
    export_port_state_dict,
    port_key,
    raise_if_unfit,
    record_geometry,
)
from .rpn import AnchorGenerator

CONVERTED_WEIGHTS_NAME = "model.safetensors"
# The real bottom-up-attention model (test.prototxt + experiments/cfgs/faster_rcnn_end2end_resnet.yml): ResNet-101
# C4, rpn_conv/3x3 512, 12 anchors (scales 4, 8, 16, 32 x 16 px; ratios 0.5, 1, 2), 1600 + 1 classes, 400 + 1
# attributes, shorter side 600 / longer side at most 1000. These are `FrcnnConfig`'s defaults.
CAFFE_RESNET101 = FrcnnConfig()
PRESET_NAME = "built-in preset for the bottom-up-attention caffemodels"
# bbox_pred: the port decodes with ROI_BOX_HEAD.BBOX_REG_WEIGHTS (10, 10, 5, 5), caffe with unit weights.
PORT_BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


# ------------------------------------------------------------------------------------------------ reading the file


@dataclass
class CaffeBlob:
    """One parameter blob: float32 `data` in its stored shape; `legacy` when the shape came from the old 4-d
    num/channels/height/width fields (caffe then accepts any layer shape that, right-aligned and padded with 1s in
    front, equals those 4 dims)."""

    data: np.ndarray
    legacy: bool = False


@dataclass
class CaffeLayer:
    name: str
    type: str
    blobs: list[CaffeBlob]


@dataclass
class CaffeNet:
    """A parsed `.caffemodel`: every layer in file order, blob-less ones included."""

    path: Path
    name: str
    layers: list[CaffeLayer]

    def by_name(self) -> dict[str, CaffeLayer]:
        return {layer.name: layer for layer in self.layers}


def read_caffemodel(path: str | Path) -> CaffeNet:
    """Parse a `.caffemodel` (caffe `NetParameter`) into float32 numpy blobs per layer.

    Raises `CheckpointError` naming the file for a file protobuf cannot parse (truncated, not a protobuf), one that
    holds no layers (a protobuf, but not a caffe net), duplicate layers, and a blob whose value count does not match
    its shape (naming the layer).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caffemodel not found: {path}")
    raw = path.read_bytes()
    try:
        message = NetParameter.FromString(raw)
    except DecodeError as error:
        raise CheckpointError(
            f"{path} is not a readable caffemodel: protobuf cannot parse it as a caffe NetParameter "
            f"({error}); the file is truncated or of another kind ({len(raw):,} bytes)"
        ) from error
    del raw
    if len(message.layer) and len(message.layers):
        raise CheckpointError(
            f"{path} mixes new-style `layer` ({len(message.layer)}) and legacy V1 `layers` ({len(message.layers)}) "
            "entries, which caffe itself refuses"
        )
    if len(message.layer):
        layers = [_read_layer(path, i, layer, layer.type) for i, layer in enumerate(message.layer)]
    else:
        layers = [
            _read_layer(path, i, layer, V1_LAYER_TYPES.get(layer.type, f"V1 type {layer.type}"))
            for i, layer in enumerate(message.layers)
        ]
    name = message.name
    del message
    if not layers:
        raise CheckpointError(
            f"{path} is not a caffemodel: it parses as a protobuf but holds no caffe layers "
            "(expected a NetParameter with `layer` entries, as caffe's Net::ToProto writes)"
        )
    seen: set[str] = set()
    for layer in layers:
        if layer.blobs and layer.name in seen:
            raise CheckpointError(f"{path}: layer {layer.name!r} with blobs appears more than once")
        seen.add(layer.name)
    return CaffeNet(path=path, name=name, layers=layers)


def _read_layer(path: Path, index: int, layer, layer_type: str) -> CaffeLayer:
    if not layer.name:
        raise CheckpointError(f"{path}: layer #{index} ({layer_type or 'no type'}) has no name")
    blobs = []
    for j, blob in enumerate(layer.blobs):
        if blob.HasField("shape"):
            shape, legacy = tuple(int(d) for d in blob.shape.dim), False
        else:
            shape, legacy = (blob.num, blob.channels, blob.height, blob.width), True
        values = blob.data if len(blob.data) or not len(blob.double_data) else blob.double_data
        data = np.array(values, dtype=np.float32)
        if data.size != int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(
                f"{path}: layer {layer.name!r} blob {j} holds {data.size:,} values for its shape {shape}: "
                "the file is damaged"
            )
        blobs.append(CaffeBlob(data.reshape(shape), legacy))
    return CaffeLayer(name=layer.name, type=layer_type, blobs=blobs)


# ------------------------------------------------------------------------------------------------ the layer map


@dataclass(frozen=True)
class LayerMapping:
    """One caffe layer and what it fills: `kind` (see `_CONVERTERS`), its caffe `type`, and `target`, the port
    checkpoint key prefix (e.g. `backbone.res4.3.conv2`). `required=False` layers may be absent (noted)."""

    layer: str
    type: str
    kind: str
    target: str
    required: bool = True


def block_name(stage: int, index: int, depth: int) -> str:
    """Caffe block name `res{stage}{letter}`: a, b, c ... (ResNet-50, and res2 / res5 always), or a, b1, b2, ... in
    res3 / res4 of ResNet-101 and 152 (KaimingHe's deploy prototxts, bottom-up-attention's test.prototxt)."""
    if depth >= 101 and stage in (3, 4) and index > 0:
        return f"res{stage}b{index}"
    return f"res{stage}{string.ascii_lowercase[index]}"


def caffe_layer_map(cfg: FrcnnConfig) -> list[LayerMapping]:
    """Every parameterised layer of the original test.prototxt for this architecture, in file order."""
    mappings = [
        LayerMapping("conv1", "Convolution", "conv", "backbone.stem.conv1"),
        LayerMapping("bn_conv1", "BatchNorm", "batchnorm", "backbone.stem.conv1"),
        LayerMapping("scale_conv1", "Scale", "scale", "backbone.stem.conv1"),
    ]

    def stage(number: int, num_blocks: int, prefix: str) -> None:
        for index in range(num_blocks):
            block = block_name(number, index, cfg.depth)
            suffix = block[len("res") :]  # "4b7"
            branches = (("branch1", "shortcut"),) if index == 0 else ()
            branches += (("branch2a", "conv1"), ("branch2b", "conv2"), ("branch2c", "conv3"))
            for branch, module in branches:
                target = f"{prefix}.{index}.{module}"
                mappings.append(LayerMapping(f"{block}_{branch}", "Convolution", "conv", target))
                mappings.append(LayerMapping(f"bn{suffix}_{branch}", "BatchNorm", "batchnorm", target))
                mappings.append(LayerMapping(f"scale{suffix}_{branch}", "Scale", "scale", target))

    for number, num_blocks in zip((2, 3, 4), cfg.blocks_per_stage, strict=True):
        stage(number, num_blocks, f"backbone.res{number}")
    rpn = "proposal_generator.rpn_head"
    mappings += [
        LayerMapping("rpn_conv/3x3", "Convolution", "conv_bias", f"{rpn}.conv"),
        LayerMapping("rpn_cls_score", "Convolution", "rpn_cls", f"{rpn}.objectness_logits"),
        LayerMapping("rpn_bbox_pred", "Convolution", "rpn_bbox", f"{rpn}.anchor_deltas"),
    ]
    stage(5, 3, "roi_heads.res5")
    head = "roi_heads.box_predictor"
    mappings += [
        LayerMapping("cls_score", "InnerProduct", "class_rows", f"{head}.cls_score"),
        LayerMapping("bbox_pred", "InnerProduct", "bbox_pred", f"{head}.bbox_pred", required=False),
        LayerMapping("cls_embedding", "Embed", "embedding_rows", f"{head}.cls_embedding"),
        LayerMapping("fc_attr", "InnerProduct", "linear", f"{head}.fc_attr"),
        LayerMapping("attr_score", "InnerProduct", "class_rows", f"{head}.attr_score"),
    ]
    return mappings


# ------------------------------------------------------------------------------------------------ blob conversion


def _anchor_order(cfg: FrcnnConfig) -> torch.Tensor:
    """For each port anchor a_p = s·R + r, the caffe anchor a_c = r·S + s (caffe enumerates ratios outer)."""
    num_sizes, num_ratios = len(cfg.anchor_sizes), len(cfg.anchor_aspect_ratios)
    a_p = torch.arange(num_sizes * num_ratios)
    return (a_p % num_ratios) * num_sizes + a_p // num_ratios


def _background_last(rows: int) -> torch.Tensor:
    """Caffe rows [1, ..., rows-1, 0]: background / "no attribute" moves from first to last."""
    return torch.cat([torch.arange(1, rows), torch.zeros(1, dtype=torch.long)])


def _batchnorm(blobs: list[torch.Tensor], cfg: FrcnnConfig) -> dict[str, torch.Tensor]:
    mean, var, factor = blobs
    # caffe: scale_factor = (f == 0) ? 0 : 1 / f, in float32, then blob * scale_factor.
    scale = torch.where(factor == 0, torch.zeros_like(factor), 1.0 / factor)
    return {"norm.running_mean": mean * scale, "norm.running_var": var * scale}


def _rpn_cls(blobs: list[torch.Tensor], cfg: FrcnnConfig) -> dict[str, torch.Tensor]:
    weight, bias = blobs
    num_anchors = weight.shape[0] // 2
    order = _anchor_order(cfg)
    logit_weight = weight[num_anchors:] - weight[:num_anchors]  # fg - bg, caffe anchor order
    logit_bias = bias[num_anchors:] - bias[:num_anchors]
    return {"weight": logit_weight[order], "bias": logit_bias[order]}


def _rpn_bbox(blobs: list[torch.Tensor], cfg: FrcnnConfig) -> dict[str, torch.Tensor]:
    weight, bias = blobs
    rows = (_anchor_order(cfg).view(-1, 1) * 4 + torch.arange(4)).reshape(-1)
    return {"weight": weight[rows], "bias": bias[rows]}


def _class_rows(blobs: list[torch.Tensor], cfg: FrcnnConfig) -> dict[str, torch.Tensor]:
    weight, bias = blobs
    rows = _background_last(weight.shape[0])
    return {"weight": weight[rows], "bias": bias[rows]}


def _embedding_rows(blobs: list[torch.Tensor], cfg: FrcnnConfig) -> dict[str, torch.Tensor]:
    (weight,) = blobs
    return {"weight": weight[_background_last(weight.shape[0])]}


def _bbox_pred(blobs: list[torch.Tensor], cfg: FrcnnConfig) -> dict[str, torch.Tensor]:
    weight, bias = blobs
    factors = torch.tensor(PORT_BBOX_REG_WEIGHTS).repeat(weight.shape[0] // 4 - 1)
    return {"weight": weight[4:] * factors.view(-1, 1), "bias": bias[4:] * factors}


# kind -> (caffe blob shapes from the port target shapes, conversion of the blobs to port tensors by key suffix)
_Shapes = Callable[[dict[str, tuple[int, ...]], str], list[tuple[int, ...]]]
_Convert = Callable[[list[torch.Tensor], FrcnnConfig], dict[str, torch.Tensor]]


def _same(*suffixes: str) -> _Shapes:
    return lambda targets, prefix: [targets[f"{prefix}.{suffix}"] for suffix in suffixes]


def _norm_shapes(count: int) -> _Shapes:
    def shapes(targets: dict[str, tuple[int, ...]], prefix: str) -> list[tuple[int, ...]]:
        channels = targets[f"{prefix}.norm.running_mean"]
        return [channels, channels, (1,)][:count]

    return shapes


def _rpn_cls_shapes(targets: dict[str, tuple[int, ...]], prefix: str) -> list[tuple[int, ...]]:
    anchors, *rest = targets[f"{prefix}.weight"]
    return [(2 * anchors, *rest), (2 * anchors,)]


def _bbox_pred_shapes(targets: dict[str, tuple[int, ...]], prefix: str) -> list[tuple[int, ...]]:
    classes, dim = targets[prefix.replace("bbox_pred", "cls_score") + ".weight"]
    return [(4 * classes, dim), (4 * classes,)]


_CONVERTERS: dict[str, tuple[_Shapes, _Convert]] = {
    "conv": (_same("weight"), lambda blobs, cfg: {"weight": blobs[0]}),
    "conv_bias": (_same("weight", "bias"), lambda blobs, cfg: {"weight": blobs[0], "bias": blobs[1]}),
    "linear": (_same("weight", "bias"), lambda blobs, cfg: {"weight": blobs[0], "bias": blobs[1]}),
    "batchnorm": (_norm_shapes(3), _batchnorm),
    "scale": (_norm_shapes(2), lambda blobs, cfg: {"norm.weight": blobs[0], "norm.bias": blobs[1]}),
    "rpn_cls": (_rpn_cls_shapes, _rpn_cls),
    "rpn_bbox": (_same("weight", "bias"), _rpn_bbox),
    "class_rows": (_same("weight", "bias"), _class_rows),
    "embedding_rows": (_same("weight"), _embedding_rows),
    "bbox_pred": (_bbox_pred_shapes, _bbox_pred),
}


def _fit(blob: CaffeBlob, expected: tuple[int, ...]) -> np.ndarray | None:
    """The blob in the expected shape, or None when caffe would refuse it (`Blob::ShapeEquals`)."""
    if blob.data.shape == expected:
        return blob.data
    if blob.legacy and len(expected) <= 4 and (1,) * (4 - len(expected)) + expected == blob.data.shape:
        return blob.data.reshape(expected)
    return None


# ------------------------------------------------------------------------------------------------ report and load


@dataclass
class CaffeLoadReport(DetectorLoadReport):
    """`DetectorLoadReport` for a `.caffemodel`: `loaded` lists caffe layers; `unexpected` layers with blobs that
    nothing uses (reported, not fatal); `ignored` the blob-less layers (ReLU, Pooling, Python, ...)."""

    config_source: str = ""
    net_name: str = ""
    batchnorm_factors: tuple[float, float] | None = None

    def summary(self) -> str:
        lines = [
            f"detector weights: {self.weights_path} (caffe net {self.net_name!r})",
            f"detector config:  {self.config_source} ({self.architecture})",
            f"detector geometry: {self.geometry} (the original caffe proposal layer: a caffemodel always runs with it)",
            f"loaded {len(self.loaded)} caffe layers ({self.num_values:,} values); missing {len(self.missing)}; "
            f"unknown layers with blobs {len(self.unexpected)}; blob-less layers {len(self.ignored)}",
        ]
        if self.batchnorm_factors is not None:
            low, high = self.batchnorm_factors
            lines.append(f"BatchNorm moving-average factors f: {low:.6g} .. {high:.6g} (statistics divided by f)")
        if self.unexpected:
            lines.append("unknown layers with blobs (not used): " + abbreviate(self.unexpected))
        lines.extend(self.notes)
        return "\n".join(lines)


def caffemodel_port_state_dict(
    net: CaffeNet, cfg: FrcnnConfig, targets: dict[str, tuple[int, ...]], report: CaffeLoadReport
) -> dict[str, torch.Tensor]:
    """The net's weights as a port-layout state dict (`port_key` names), checked against `targets` (port key ->
    shape the config implies). Fills `report`; raises `CheckpointError` naming every missing layer, layer of
    another type and misshapen blob."""
    layers = net.by_name()
    state: dict[str, torch.Tensor] = {}
    mapped: set[str] = set()
    factors: list[float] = []
    for mapping in caffe_layer_map(cfg):
        mapped.add(mapping.layer)
        layer = layers.get(mapping.layer)
        if layer is None:
            if mapping.required:
                report.missing.append(mapping.layer)
            else:
                report.notes.append(f"note: no {mapping.layer!r} layer (unused by extraction)")
            continue
        if layer.type != mapping.type:
            report.mismatched.append(f"{layer.name}: a {layer.type} layer, expected {mapping.type}")
            continue
        shapes_of, convert = _CONVERTERS[mapping.kind]
        expected = shapes_of(targets, mapping.target)
        if len(layer.blobs) != len(expected):
            report.mismatched.append(
                f"{layer.name}: {len(layer.blobs)} blobs, expected {len(expected)} ({_shapes(expected)})"
            )
            continue
        fitted = [_fit(blob, shape) for blob, shape in zip(layer.blobs, expected, strict=True)]
        wrong = [j for j, array in enumerate(fitted) if array is None]
        if wrong:
            report.mismatched.append(
                f"{layer.name}: blob shapes {_shapes([b.data.shape for b in layer.blobs])}, "
                f"the config implies {_shapes(expected)}"
            )
            continue
        blobs = [torch.from_numpy(array) for array in fitted]
        if mapping.kind == "batchnorm":
            factors.append(float(blobs[2][0]))
        for suffix, tensor in convert(blobs, cfg).items():
            state[f"{mapping.target}.{suffix}"] = tensor.contiguous()
        report.loaded.append(layer.name)
        report.num_values += sum(array.size for array in fitted)
    for layer in net.layers:
        if layer.name not in mapped:
            if layer.blobs:
                report.unexpected.append(f"{layer.name} ({layer.type}, {_shapes([b.data.shape for b in layer.blobs])})")
            else:
                report.ignored.append(layer.name)
    if factors:
        report.batchnorm_factors = (min(factors), max(factors))
    hint = (" (a caffemodel of another architecture needs its port-format config.yaml: --detector-config)"
            if report.config_path is None else "")
    raise_if_unfit(report, f"{net.path} does not fit the {report.config_source}{hint} ({cfg.summary()})", "layers ")
    return state


def _shapes(shapes: Sequence[tuple[int, ...]]) -> str:
    return ", ".join("x".join(str(d) for d in shape) or "scalar" for shape in shapes)


class CaffemodelGeometryError(UserInputError):
    """A `.caffemodel` asked to run with another geometry than `caffe`."""


def check_caffemodel_geometry(path: str | Path, geometry: str) -> None:
    """A caffemodel is the original network: it only runs with the original proposal layer (`caffe`)."""
    if check_geometry(geometry) != CAFFE:
        raise CaffemodelGeometryError(
            f"{path} holds the original caffe network, which runs only with geometry {CAFFE!r}: its RPN channels, "
            f"anchors and proposal layer are caffe's, and geometry {geometry!r} would decode them with the HF "
            "port's anchors and proposal layer, i.e. another detector. Drop the geometry setting or set it to caffe."
        )


def read_caffemodel_state(
    path: str | Path,
    config: str | Path | None = None,
    roi_chunk_size: int | None = None,
    channels_last: bool = True,
) -> tuple[BottomUpFasterRCNN, dict[str, torch.Tensor], CaffeLoadReport]:
    """(model with the caffemodel's weights loaded, the full port-layout state dict incl. `bbox_pred` and the port's
    `cell_anchors`, report). The model runs the `caffe` geometry; `channels_last` as in `build_detector`."""
    path = Path(path)
    cfg = FrcnnConfig.from_yaml(config) if config is not None else CAFFE_RESNET101
    net = read_caffemodel(path)
    model = build_detector(cfg, roi_chunk_size=roi_chunk_size, geometry=CAFFE, channels_last=channels_last)
    targets = {port_key(key): tuple(value.shape) for key, value in model.state_dict().items()}
    report = CaffeLoadReport(
        config_path=Path(config) if config is not None else None,  # type: ignore[arg-type]
        weights_path=path,
        architecture=cfg.summary(),
        config_source=f"config {config}" if config is not None else PRESET_NAME,
        net_name=net.name,
        geometry=CAFFE,
    )
    state = caffemodel_port_state_dict(net, cfg, targets, report)
    del net
    # Caffe makes its anchors in the proposal layer; the port-layout dict gets the port's for the config.
    state[port_key("rpn.anchor_generator.cell_anchors")] = AnchorGenerator.generate_cell_anchors(
        cfg.anchor_sizes, cfg.anchor_aspect_ratios
    )
    model.load_state_dict({key: state[port_key(key)] for key in model.state_dict()}, strict=True)
    return model, state, report


def load_caffemodel(
    path: str | Path,
    config: str | Path | None = None,
    device: str | torch.device = "cpu",
    roi_chunk_size: int | None = None,
    geometry: str = CAFFE,
    channels_last: bool = True,
) -> tuple[BottomUpFasterRCNN, CaffeLoadReport]:
    """Build the detector (the `CAFFE_RESNET101` preset, or `config`, a port-format config.yaml) with the `caffe`
    geometry and load a `.caffemodel` into it (`channels_last` as in `build_detector`). Raises `CheckpointError` naming the file or the layers that do not fit,
    `CaffemodelGeometryError` for another geometry."""
    check_caffemodel_geometry(path, geometry)
    model, _, report = read_caffemodel_state(path, config, roi_chunk_size, channels_last=channels_last)
    return model.to(device), report


def convert_caffemodel(path: str | Path, out_dir: str | Path, config: str | Path | None = None) -> CaffeLoadReport:
    """Write `out_dir/config.yaml` + `out_dir/model.safetensors` (the port's format and key names, `bbox_pred` in the
    port's layout, the port's `cell_anchors`, so that the HF port itself also loads it) from a `.caffemodel`, so that
    the protobuf parse happens once. Loading `out_dir` gives the same network as loading the caffemodel directly (the
    config records the `caffe` geometry; an explicit `--geometry port` still wins)."""
    model, state, report = read_caffemodel_state(path, config)
    cfg = CAFFE_RESNET101 if config is None else FrcnnConfig.from_yaml(config)
    export = export_port_state_dict(model, cfg)
    kept = ("roi_heads.box_predictor.bbox_pred.", port_key("rpn.anchor_generator.cell_anchors"))
    export.update({key: value for key, value in state.items() if key.startswith(kept)})
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_yaml(out_dir / CONFIG_NAME)
    record_geometry(out_dir / CONFIG_NAME, CAFFE)  # loading out_dir then needs no --geometry
    with atomic_path(out_dir / CONVERTED_WEIGHTS_NAME) as temp:
        save_file(export, str(temp), metadata={"converted_from": str(Path(path).name)})
    return report
