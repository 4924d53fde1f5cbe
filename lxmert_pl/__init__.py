"""lxmert_pl: image-text matching with LXMERT.

Matching-head convention, everywhere in this package: the matching head
(`cross_relationship_score`) returns two logits and **index 1 means "matched"**;
P(match) = softmax(logits)[:, 1].
"""

__version__ = "0.1.0"
MATCHED_INDEX = 1


def __getattr__(name: str):
    """`from lxmert_pl import Matcher` without importing torch for `import lxmert_pl` alone."""
    if name == "Matcher":
        from lxmert_pl.matcher import Matcher

        return Matcher
    raise AttributeError(f"module 'lxmert_pl' has no attribute {name!r}")
