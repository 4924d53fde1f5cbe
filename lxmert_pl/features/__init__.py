"""Detected-object features: the shared `ImageFeatures` record, TSV files, binary stores, and sources over them.

Modules: `record` (ImageFeatures, the per-box schema, the boxes check), `codec` (one TSV line <-> one record),
`lines` (scanning, the last line, repair), `index` (byte offsets), `tsv` (reader and writer), `check`, `store`
(binary stores), `sources` (one interface over all of them), `provenance` (settings sidecars), `locking` (one writer
per file), `errors`.

CLI: `python -m lxmert_pl.features {convert,index,check,repair} ...` (see `lxmert_pl/features/__main__.py`).
"""

from lxmert_pl.features.check import TsvCheckReport, check_tsv
from lxmert_pl.features.codec import FIELDNAMES, decode_row, encode_row
from lxmert_pl.features.errors import (
    DuplicateImageIdError,
    FeatureFileError,
    FeatureFileLockedError,
    MissingImageError,
    NotAFeatureTsvError,
    ProvenanceMismatchError,
    StaleIndexError,
    TruncatedTsvError,
)
from lxmert_pl.features.index import TsvIndex, build_index, load_or_build_index
from lxmert_pl.features.lines import repair_tail, repair_truncated, truncated_tail_bytes
from lxmert_pl.features.provenance import ExtractionSettings, read_settings, sidecar_path
from lxmert_pl.features.record import ImageFeatures, box_problem
from lxmert_pl.features.sources import (
    FeatureSource,
    MergedFeatureSource,
    expand_feature_paths,
    iter_source_features,
    open_feature_source,
)
from lxmert_pl.features.store import FeatureStore, convert_tsvs_to_store, is_feature_store
from lxmert_pl.features.tsv import TsvReader, TsvWriter, iter_tsv_features, read_img_ids

__all__ = [
    "FIELDNAMES",
    "DuplicateImageIdError",
    "ExtractionSettings",
    "FeatureFileError",
    "FeatureFileLockedError",
    "FeatureSource",
    "FeatureStore",
    "ImageFeatures",
    "MergedFeatureSource",
    "MissingImageError",
    "NotAFeatureTsvError",
    "ProvenanceMismatchError",
    "StaleIndexError",
    "TruncatedTsvError",
    "TsvCheckReport",
    "TsvIndex",
    "TsvReader",
    "TsvWriter",
    "box_problem",
    "build_index",
    "check_tsv",
    "convert_tsvs_to_store",
    "decode_row",
    "encode_row",
    "expand_feature_paths",
    "is_feature_store",
    "iter_source_features",
    "iter_tsv_features",
    "load_or_build_index",
    "open_feature_source",
    "read_img_ids",
    "read_settings",
    "repair_tail",
    "repair_truncated",
    "sidecar_path",
    "truncated_tail_bytes",
]
