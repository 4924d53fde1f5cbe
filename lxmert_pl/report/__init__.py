"""The evaluation report (`report.html`): galleries of chosen predictions drawn as pictures with their detections and
the boxes the sentence attends to, the run's header, metrics and plots. See `gallery` (which rows), `cards`
(their pictures), `page` (the HTML)."""

from lxmert_pl.report.cards import Card, Detections, ImageLookup, make_cards
from lxmert_pl.report.gallery import Gallery, select_galleries, shown_rows
from lxmert_pl.report.page import ReportPage, RetrievalQuery, render

__all__ = ["Card", "Detections", "ImageLookup", "make_cards", "Gallery", "select_galleries", "shown_rows",
           "ReportPage", "RetrievalQuery", "render"]
