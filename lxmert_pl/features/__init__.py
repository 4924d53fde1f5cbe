"""Detected-object features: the shared `ImageFeatures` record, TSV files, binary stores, and sources over them.

CLI: `python -m lxmert_pl.features {convert,index,check,repair} ...` (see `lxmert_pl/features/__main__.py`).
"""

from lxmert_pl.features.sources import (
    FeatureSource,
    MergedFeatureSource,
    expand_feature_paths,
    iter_source_features,
    open_feature_source,
)
from lxmert_pl.features.store import FeatureStore, convert_tsvs_to_store, is_feature_store
from lxmert_pl.features.tsv import (
    FIELDNAMES,
    DuplicateImageIdError,
    FeatureFileError,
    MissingImageError,
    StaleIndexError,
    TruncatedTsvError,
    TsvIndex,
    TsvReader,
    TsvWriter,
    build_index,
    check_tsv,
    decode_row,
    encode_row,
    iter_tsv_features,
    load_or_build_index,
    read_img_ids,
    repair_truncated,
    truncated_tail_bytes,
)
from lxmert_pl.features.types import ImageFeatures

__all__ = [
    "FIELDNAMES",
    "DuplicateImageIdError",
    "FeatureFileError",
    "FeatureSource",
    "FeatureStore",
    "ImageFeatures",
    "MergedFeatureSource",
    "MissingImageError",
    "StaleIndexError",
    "TruncatedTsvError",
    "TsvIndex",
    "TsvReader",
    "TsvWriter",
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
    "repair_truncated",
    "truncated_tail_bytes",
]
