"""Probing benchmarks for a matching head: their file formats and metrics, as pure functions (no model needed).

    bench = load_benchmark("winoground", "data/winoground/examples.jsonl")
    pairs = bench.pairs()                       # the distinct (img_id, sentence) pairs to score, each once
    result = bench.evaluate(score, threshold)   # score(img_id, sentence) -> float; BenchmarkResult

- `winoground`: Winoground's `examples.jsonl` (or `hf://datasets/facebook/winoground`): text/image/group scores;
- `valse`: VALSE's piece files: acc_r, p_c, p_f, acc, min(p_c, p_f) per piece and averaged;
- `negatives`: caption-vs-negative sets in SugarCrepe's layout: accuracy per category.
The run that scores the pairs with a model is `lxmert_pl.runs.benchmark` (`eval.py --task benchmark`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .common import BenchmarkFileError, BenchmarkResult, PairKey, ScoreTable, Table, image_key, unique_pairs
from .hub import fetch_winoground, is_hub_dataset
from .negatives import evaluate_negatives, load_negatives
from .valse import evaluate_valse, load_valse
from .winoground import default_image_folder, evaluate_winoground, load_winoground

BENCHMARK_NAMES = ("winoground", "valse", "negatives")


@dataclass
class Benchmark:
    """A loaded benchmark: its items (each with `images`, `pairs()`, `describe()`) and how to score them."""

    name: str
    data: str
    items: list
    evaluator: Callable[[Sequence, Callable[[str, str], float], float], BenchmarkResult]
    image_folder: Path | None = None  # where the published layout keeps the images (used without --images)
    num_not_valid: int = 0  # VALSE items left out as not validated by the annotators

    def pairs(self, items: Sequence | None = None) -> list[PairKey]:
        return unique_pairs(pair for item in (self.items if items is None else items) for pair in item.pairs())

    def evaluate(self, score: Callable[[str, str], float], threshold: float, items: Sequence | None = None
                 ) -> BenchmarkResult:
        return self.evaluator(self.items if items is None else items, score, threshold)


def load_benchmark(name: str, data: str | Path, valid_only: bool = True) -> Benchmark:
    """Load `data` (a file, a folder, or for winoground `hf://datasets/ORG/NAME`) in the format `name`."""
    if not data:
        raise BenchmarkFileError(f"no benchmark data: pass --data PATH (benchmark {name})")
    data = str(data)
    if name == "winoground":
        if is_hub_dataset(data):
            examples, images = fetch_winoground(data)
            return Benchmark(name, data, load_winoground(examples), evaluate_winoground, images)
        folder = default_image_folder(data)
        return Benchmark(name, data, load_winoground(data), evaluate_winoground, folder if folder.is_dir() else None)
    if is_hub_dataset(data):
        raise BenchmarkFileError(f"{data}: only winoground is read from the Hub; pass a local file or folder")
    if name == "valse":
        items, not_valid = load_valse(data, valid_only=valid_only)
        return Benchmark(name, data, items, evaluate_valse, num_not_valid=not_valid)
    if name == "negatives":
        return Benchmark(name, data, load_negatives(data), evaluate_negatives)
    raise BenchmarkFileError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARK_NAMES)}")


__all__ = [
    "BENCHMARK_NAMES", "Benchmark", "BenchmarkFileError", "BenchmarkResult", "PairKey", "ScoreTable", "Table",
    "image_key", "load_benchmark",
]
