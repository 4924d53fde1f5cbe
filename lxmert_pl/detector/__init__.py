"""Bottom-up-attention Faster R-CNN (ResNet-101 C4, Visual Genome 1600 classes / 400 attributes) on torchvision.

Loads the HF port's checkpoints (`unc-nlp/frcnn-vg-finetuned`: `config.yaml` + `pytorch_model.bin` or safetensors)
and reproduces the original caffe extraction's preprocessing and box selection (obj36 / 10-100 boxes), batch-invariant.

    model, report = load_detector("frcnn-vg-finetuned/", geometry="caffe")
    rows = model.extract(["a.jpg", "b.jpg"], selection=OBJ36)      # list[ImageFeatures]

Proposal geometry (`geometry.py`): `geometry="port"` runs the HF port's proposal layer (`RegionProposalNetwork`),
`geometry="caffe"` the original caffe TEST proposal layer (`CaffeProposalLayer`) on the same RPN head, with caffe's
float64 mean subtraction; `model.geometry` says which a detector has. `choose_geometry(explicit, registry_default)`
is the rule every entry point uses (explicit choice, else the registry's value, else "port"). Another proposal layer
plugs in as `BottomUpFasterRCNN(transform, backbone, rpn, roi_head)` with any `rpn` module that has a `geometry`
attribute and `forward(res4 (1, C, h, w), (H, W), scale) -> (boxes (P, 4) network px, objectness logits (P,))`.
Weights of another format (e.g. a .caffemodel) load through `detector_from_port_state_dict(cfg, state, ...,
geometry="caffe")` once mapped to the port's key names and layout. `load_box_regressor` reads the RoI head's
`bbox_pred`, which extraction does not use; `probe.py` uses it to tell from the weights which geometry they were
trained with (`python -m lxmert_pl.detector probe`).
"""

from .caffe_proposals import CaffeAnchorGenerator, CaffeProposalLayer, caffe_fg_probability, caffe_nms
from .caffemodel import CAFFE_RESNET101, CaffeLoadReport, convert_caffemodel, load_caffemodel, read_caffemodel
from .config import FrcnnConfig
from .geometry import DEFAULT_GEOMETRY, GEOMETRIES, UnknownGeometryError, check_geometry, choose_geometry
from .image_source import ExtractionFailedError, ImageFolderFeatureSource
from .loading import CheckpointError, DetectorLoadReport, detector_from_port_state_dict, load_box_regressor, load_detector
from .model import BottomUpFasterRCNN, ImageRegions, build_detector
from .preprocess import CaffePreprocess, ImageReadError, read_image
from .rpn import RegionProposalNetwork
from .selection import ADAPTIVE_10_100, OBJ36, BoxSelection, SelectedBoxes, select_boxes
from .random_weights import save_tiny_detector

__all__ = [
    "ADAPTIVE_10_100",
    "CAFFE_RESNET101",
    "DEFAULT_GEOMETRY",
    "GEOMETRIES",
    "OBJ36",
    "BottomUpFasterRCNN",
    "BoxSelection",
    "CaffeAnchorGenerator",
    "CaffeLoadReport",
    "CaffePreprocess",
    "CaffeProposalLayer",
    "CheckpointError",
    "ExtractionFailedError",
    "FrcnnConfig",
    "ImageFolderFeatureSource",
    "ImageReadError",
    "ImageRegions",
    "DetectorLoadReport",
    "RegionProposalNetwork",
    "SelectedBoxes",
    "UnknownGeometryError",
    "build_detector",
    "caffe_fg_probability",
    "caffe_nms",
    "check_geometry",
    "choose_geometry",
    "convert_caffemodel",
    "detector_from_port_state_dict",
    "load_box_regressor",
    "load_caffemodel",
    "load_detector",
    "read_caffemodel",
    "read_image",
    "save_tiny_detector",
    "select_boxes",
]
