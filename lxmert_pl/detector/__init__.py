"""Bottom-up-attention Faster R-CNN (ResNet-101 C4, Visual Genome 1600 classes / 400 attributes) on torchvision.

Loads the HF port's checkpoints (`unc-nlp/frcnn-vg-finetuned`: `config.yaml` + `pytorch_model.bin` or safetensors)
and reproduces the original caffe extraction's preprocessing and box selection (obj36 / 10-100 boxes), batch-invariant.

    model, report = load_detector("frcnn-vg-finetuned/")
    rows = model.extract(["a.jpg", "b.jpg"], selection=OBJ36)      # list[ImageFeatures]
"""

from .config import FrcnnConfig
from .image_source import ExtractionFailedError, ImageFolderFeatureSource
from .loading import CheckpointError, LoadReport, load_detector
from .model import BottomUpFasterRCNN, ImageRegions, build_detector
from .preprocess import CaffePreprocess, ImageReadError, read_image
from .selection import ADAPTIVE_10_100, OBJ36, BoxSelection, Selection, select_boxes
from .tiny import save_tiny_detector

__all__ = [
    "ADAPTIVE_10_100",
    "OBJ36",
    "BottomUpFasterRCNN",
    "BoxSelection",
    "CaffePreprocess",
    "CheckpointError",
    "ExtractionFailedError",
    "FrcnnConfig",
    "ImageFolderFeatureSource",
    "ImageReadError",
    "ImageRegions",
    "LoadReport",
    "Selection",
    "build_detector",
    "load_detector",
    "read_image",
    "save_tiny_detector",
    "select_boxes",
]
