"""Sentence-image pairs: the `Pair` record and the loaders of pair files."""

from lxmert_pl.pairs.io import Pair, PairFileError, load_pairs

__all__ = ["Pair", "PairFileError", "load_pairs"]
