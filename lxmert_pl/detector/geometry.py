"""Which proposal geometry the detector uses: its names, the default, and the validation of a user's choice.

* `port`: the HF port's / detectron2's proposal layer (`rpn.RegionProposalNetwork`, SPEC.md §3 right column). Right
  for weights trained with it (the bundled `demo-frcnn`).
* `caffe`: the ORIGINAL bottom-up-attention proposal layer (`caffe_proposals.CaffeProposalLayer`, SPEC.md §3 left
  column) run on the port-format weights, plus caffe's float64 mean subtraction. Right for the weights that made
  LXMERT's pretraining features (`frcnn-vg-finetuned`): lxr955 was pretrained on features from that extractor.

Everything else (backbone, RoI pooling, heads, box selection) is the same in both.
"""

from __future__ import annotations

from ..errors import UserInputError

PORT = "port"
CAFFE = "caffe"
GEOMETRIES = (PORT, CAFFE)
DEFAULT_GEOMETRY = PORT


class UnknownGeometryError(UserInputError):
    """A geometry name that is not one of `GEOMETRIES`; the message lists the valid ones."""


def check_geometry(geometry: str, source: str = "geometry") -> str:
    """`geometry` itself when it is one of `GEOMETRIES`, else `UnknownGeometryError` naming `source` and the valid
    names."""
    if geometry not in GEOMETRIES:
        raise UnknownGeometryError(
            f"{source}: unknown detector geometry {geometry!r}; valid geometries: {', '.join(GEOMETRIES)}"
        )
    return geometry


def choose_geometry(
    explicit: str | None, registry_default: str | None = None, source: str = "geometry"
) -> str | None:
    """The geometry a run asks for: the explicit choice (a `--geometry` flag, a config key named by `source`) when
    given, else the registry's value for the detector alias, else None: the weights' own (`load_detector`: `caffe`
    for a `.caffemodel` and for a directory that `convert` wrote from one, else `DEFAULT_GEOMETRY`, `port`).
    Validated."""
    if explicit is not None:
        return check_geometry(explicit, source)
    if registry_default is not None:
        return check_geometry(registry_default, "checkpoint registry")
    return None
