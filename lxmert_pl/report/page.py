"""The report page: one self-contained HTML file (inline style sheet, pictures as data URIs, no script, no font or
CDN), so it opens from file:// and in an HTML viewer (wandb's included) alike. Every text from the data (captions,
ids, paths, labels) goes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from lxmert_pl.report.cards import Card
from lxmert_pl.report.gallery import Gallery

# Shown first, in this order, as large numbers; the rest of the metrics follow in the table.
HEADLINE_METRICS = ("accuracy", "roc_auc", "f1", "average_precision", "precision", "recall")
COUNT_METRICS = ("num_pairs", "tn", "fp", "fn", "tp")


@dataclass
class RetrievalQuery:
    """One retrieval query for the report: the query (a caption or an image), its top hits and the truth's rank."""

    title: str  # the caption text, or "image <img_id>"
    rank: int  # 1-based rank of the first ground-truth item
    direction: str  # "text -> image" or "image -> text"
    hits: list[dict] = field(default_factory=list)  # {"text": str, "picture_uri": str | None, "truth": bool, "score"}
    picture_uri: str | None = None  # the query image (image -> text)


@dataclass
class ReportPage:
    """What the page shows; `render` turns it into HTML."""

    title: str
    header: list[tuple[str, str]]
    metrics: dict[str, float] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    galleries: list[Gallery] = field(default_factory=list)
    cards: dict[int, Card] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    retrieval: list[RetrievalQuery] = field(default_factory=list)
    threshold: float | None = None


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


STYLE = """
:root { --ink:#1f2328; --muted:#5f6b7a; --line:#d8dee4; --panel:#fff; --bg:#f3f4f6; --accent:#3b6fd8;
        --good:#1a7f37; --bad:#c62828; --why:#b58900; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
header.top { background:#24292f; color:#fff; padding:14px 28px; }
header.top h1 { margin:0; font-size:20px; font-weight:600; }
header.top .sub { color:#c9d1d9; font-size:13px; margin-top:2px; }
nav { padding:8px 28px; background:#fff; border-bottom:1px solid var(--line); position:sticky; top:0; z-index:2; }
nav a { color:var(--accent); text-decoration:none; margin-right:18px; font-weight:500; }
main { padding:18px 28px 40px; max-width:1560px; }
section.panel { background:var(--panel); border:1px solid var(--line); border-radius:8px; margin:0 0 18px;
                padding:14px 18px; }
section.panel > h2 { margin:0 0 2px; font-size:16px; }
.desc { color:var(--muted); font-size:13px; margin:0 0 10px; }
table.kv { border-collapse:collapse; width:100%; font-size:13px; }
table.kv td { padding:3px 10px 3px 0; vertical-align:top; border-bottom:1px solid #eef1f4; }
table.kv td.k { color:var(--muted); white-space:nowrap; width:1%; }
table.kv td.v { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; word-break:break-all; }
.headline { display:flex; flex-wrap:wrap; gap:12px; margin:6px 0 12px; }
.stat { border:1px solid var(--line); border-radius:6px; padding:8px 14px; min-width:120px; }
.stat .n { font-size:24px; font-weight:600; }
.stat .l { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.plots { display:flex; flex-wrap:wrap; gap:12px; }
.mgrid { display:grid; grid-template-columns:repeat(auto-fill, minmax(210px, 1fr)); column-gap:22px; font-size:13px; }
.mgrid .m { display:flex; justify-content:space-between; border-bottom:1px solid #eef1f4; padding:2px 0; }
.mgrid .k { color:var(--muted); } .mgrid .v { font-family:ui-monospace,Menlo,Consolas,monospace; }
.plots img { height:240px; border:1px solid var(--line); border-radius:6px; background:#fff; }
.grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(262px, 1fr)); gap:12px; }
.card { border:1px solid var(--line); border-radius:6px; overflow:hidden; background:#fff; display:flex;
        flex-direction:column; }
.card .pic { background:#17181c; display:flex; align-items:center; justify-content:center; min-height:120px; }
.card .pic img { display:block; max-width:100%; }
.card .body { padding:8px 10px 10px; }
.card .cap { font-weight:600; margin-bottom:6px; overflow-wrap:anywhere; }
.chips { display:flex; flex-wrap:wrap; gap:4px; margin-bottom:6px; }
.chip { font-size:12px; border-radius:10px; padding:1px 8px; background:#eef1f4; white-space:nowrap; }
.chip.true { background:#dafbe1; color:var(--good); } .chip.false { background:#ffebe9; color:var(--bad); }
.chip.score { font-weight:600; }
.bar { height:5px; background:#eef1f4; border-radius:3px; position:relative; margin:2px 0 6px; }
.bar span { position:absolute; left:0; top:0; bottom:0; border-radius:3px; background:var(--accent); }
.bar i { position:absolute; top:-3px; bottom:-3px; width:2px; background:#24292f; }
.ids { color:var(--muted); font-size:12px; font-family:ui-monospace,Menlo,Consolas,monospace; overflow-wrap:anywhere; }
.why { font-size:12px; margin-top:4px; }
.why b { color:var(--why); }
.note { font-size:12px; color:var(--bad); margin-top:4px; }
.legend { font-size:12px; color:var(--muted); margin:4px 0 10px; }
.legend .solid { display:inline-block; width:18px; height:10px; border:2px solid #00c8ff; vertical-align:middle; }
.legend .dashed { display:inline-block; width:18px; height:10px; border:2px dashed #e6b800; vertical-align:middle; }
.empty { color:var(--muted); font-style:italic; }
.query { border-top:1px solid var(--line); padding:10px 0; }
.query h3 { font-size:14px; margin:0 0 6px; }
.qrow { display:flex; gap:12px; align-items:flex-start; }
.qpic img { width:256px; display:block; border-radius:6px; }
.hits { display:flex; flex-wrap:wrap; gap:8px; align-content:flex-start; }
.hit { width:200px; border:1px solid var(--line); border-radius:6px; padding:4px; font-size:12px; }
.hit.truth { border:2px solid var(--good); }
.hit img { width:100%; display:block; border-radius:3px; }
footer { color:var(--muted); font-size:12px; padding:0 28px 24px; }
"""


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4f}"
    return str(value)


def _metric_text(key: str, value: object) -> str:
    if isinstance(value, float) and value.is_integer() and (key in COUNT_METRICS or key.startswith("num_")
                                                             or key.endswith(("_groups", "_queries"))):
        return str(int(value))
    return _fmt(value)


def _header(page: ReportPage) -> str:
    rows = "".join(f'<tr><td class="k">{esc(k)}</td><td class="v">{esc(v)}</td></tr>' for k, v in page.header)
    return f'<section class="panel" id="run"><h2>Run</h2><table class="kv">{rows}</table></section>'


def _metrics(page: ReportPage) -> str:
    if not page.metrics:
        return ('<section class="panel" id="metrics"><h2>Metrics</h2><p class="empty">No labels in the pairs: '
                'predictions only.</p></section>')
    stats = "".join(f'<div class="stat"><div class="n">{esc(_metric_text(k, page.metrics[k]))}</div>'
                    f'<div class="l">{esc(k.replace("_", " "))}</div></div>'
                    for k in HEADLINE_METRICS if k in page.metrics)
    cells = "".join(f'<div class="m"><span class="k">{esc(k)}</span><span class="v">{esc(_metric_text(k, v))}</span>'
                    f'</div>' for k, v in page.metrics.items())
    plots = "".join(f'<img alt="{esc(p.stem)}" title="{esc(p.stem)}" src="{png_data_uri(p)}">' for p in page.plots)
    plots_html = f'<h2 style="margin-top:14px">Plots</h2><div class="plots">{plots}</div>' if plots else ""
    return (f'<section class="panel" id="metrics"><h2>Metrics</h2><div class="headline">{stats}</div>'
            f'<div class="mgrid">{cells}</div>{plots_html}</section>')


def _card(card: Card, threshold: float | None) -> str:
    row = card.row
    score = float(row["score"])
    chips = [f'<span class="chip score">score {score:.3f}</span>']
    if "ground" in row:
        chips.append(f'<span class="chip {str(row["ground"]).lower()}">ground {esc(row["ground"])}</span>')
    chips.append(f'<span class="chip">answer {esc(row["answer"])}</span>')
    bar = ""
    if 0.0 <= score <= 1.0:
        mark = f'<i style="left:{100 * threshold:.1f}%"></i>' if threshold is not None and 0 <= threshold <= 1 else ""
        bar = f'<div class="bar"><span style="width:{100 * score:.1f}%"></span>{mark}</div>'
    pic = (f'<div class="pic"><img alt="img_id {esc(row["img_id"])}" src="{card.picture_uri}"></div>'
           if card.picture_uri else '<div class="pic"></div>')
    why = ""
    if card.why:
        parts = ", ".join(f"{esc(label)} <b>{weight:.0%}</b>" for label, weight in card.why)
        why = f'<div class="why"><b>why</b>: {parts}</div>'
    note = f'<div class="note">{esc(card.note)}</div>' if card.note else ""
    return (f'<div class="card" data-question-id="{esc(row.get("question_id", ""))}">{pic}<div class="body">'
            f'<div class="cap">&ldquo;{esc(row["sent"])}&rdquo;</div><div class="chips">{"".join(chips)}</div>{bar}'
            f'<div class="ids">img_id {esc(row["img_id"])} · question_id {esc(row.get("question_id", ""))}</div>'
            f'{why}{note}</div></div>')


def _gallery(gallery: Gallery, page: ReportPage) -> str:
    count = f"{len(gallery.rows)} shown of {gallery.total}"
    cards = "".join(_card(page.cards[i], page.threshold) for i in gallery.rows if i in page.cards)
    body = f'<div class="grid">{cards}</div>' if cards else '<p class="empty">none</p>'
    return (f'<section class="panel gallery" id="{esc(gallery.key)}"><h2>{esc(gallery.title)} '
            f'<span class="desc">({esc(count)})</span></h2><p class="desc">{esc(gallery.description)}</p>'
            f'{body}</section>')


def _retrieval(page: ReportPage) -> str:
    if not page.retrieval:
        return ""
    items = []
    for query in page.retrieval:
        hits = []
        for k, hit in enumerate(query.hits, 1):
            pic = f'<img alt="" src="{hit["picture_uri"]}">' if hit.get("picture_uri") else ""
            mark = ' <span class="chip true">ground truth</span>' if hit.get("truth") else ""
            hits.append(f'<div class="hit{" truth" if hit.get("truth") else ""}">{pic}<div><b>#{k}</b> '
                        f'{esc(hit["text"])} <span class="ids">{hit.get("score", 0):.3f}</span>{mark}</div></div>')
        qpic = f'<div class="qpic"><img alt="" src="{query.picture_uri}"></div>' if query.picture_uri else ""
        rank = f"ground truth at rank {query.rank}" if query.rank else "ground truth never retrieved"
        items.append(f'<div class="query"><h3>{esc(query.direction)}: {esc(query.title)} '
                     f'<span class="desc">({rank})</span></h3>'
                     f'<div class="qrow">{qpic}<div class="hits">{"".join(hits)}</div></div></div>')
    return (f'<section class="panel gallery" id="worst-queries"><h2>Worst queries</h2><p class="desc">the queries '
            f'whose ground truth ranks lowest, each with its top {len(page.retrieval[0].hits)}</p>{"".join(items)}'
            f'</section>')


def render(page: ReportPage) -> str:
    """The whole page as an HTML string."""
    links = [("run", "Run"), ("metrics", "Metrics")] + [(g.key, g.title) for g in page.galleries]
    if page.retrieval:
        links.append(("worst-queries", "Worst queries"))
    nav = "".join(f'<a href="#{esc(key)}">{esc(text)}</a>' for key, text in links)
    why = ('&nbsp; <span class="dashed"></span> <b>why</b>: the boxes the sentence attends to most (last '
           'cross-modality layer, language&rarr;vision attention from [CLS], mean over heads), with their weights'
           if any(card.why for card in page.cards.values()) else "")
    legend = f'<div class="legend"><span class="solid"></span> detections (attribute, class, confidence) {why}</div>'

    galleries = "".join(_gallery(g, page) for g in page.galleries)
    notes = "".join(f"<li>{esc(n)}</li>" for n in page.notes)
    notes_html = f'<section class="panel" id="notes"><h2>Notes</h2><ul>{notes}</ul></section>' if notes else ""
    shown_legend = legend if page.galleries or page.retrieval else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(page.title)}</title>'
            f'<style>{STYLE}</style></head><body><header class="top"><h1>{esc(page.title)}</h1>'
            f'<div class="sub">lxmert_pl evaluation report</div></header><nav>{nav}</nav><main>'
            f'{_header(page)}{_metrics(page)}{shown_legend}{galleries}{_retrieval(page)}{notes_html}</main>'
            f'<footer>Self-contained page: pictures are embedded; nothing is loaded from elsewhere.</footer>'
            f'</body></html>\n')


__all__ = ["ReportPage", "RetrievalQuery", "render", "esc"]
