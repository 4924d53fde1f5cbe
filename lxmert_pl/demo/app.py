"""The demo page (Gradio Blocks): drop an image, type sentences, see which match and the regions behind them.

`build_app(engine, ...)` lays out the page on a `DemoEngine`; `python -m lxmert_pl.demo` loads the weights and
launches it. Endpoints (for `gradio_client`):

* `/match` (image, sentences, mode) -> (table, drawn image, sentence choice): the sentences sorted by score, exactly
  as `Matcher.score` returned them (the table's `score` column keeps every digit; the page shows 3);
* `/why` (sentence) -> the last matched image drawn with that sentence's attended boxes highlighted.
"""

from __future__ import annotations

import os
import socket

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page never phones home

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from lxmert_pl.demo.engine import MODE_NAMES, DemoEngine, Ranked, parse_sentences  # noqa: E402
from lxmert_pl.demo.samples import Example  # noqa: E402
from lxmert_pl.errors import LxmertPlError, UserInputError  # noqa: E402

TABLE_HEADERS = ["rank", "sentence", "score"]
WHY_NOTE = ("**Dashed yellow**: the boxes the chosen sentence looked at most (its first token's attention in the last "
            "cross-modality layer, mean over heads; the share in %). Solid: the other detections.")
CSS = """
.weights-note {font-size: 0.9em}
.demo-warning {border-left: 4px solid #d97706; padding: 6px 12px; background: rgba(217, 119, 6, 0.08);
               border-radius: 4px}
#drawn img {max-height: 480px; object-fit: contain}
footer {display: none !important}
"""


def theme() -> gr.themes.Base:
    """Gradio's default look with system fonts: the page loads nothing from outside (no web fonts)."""
    system = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
    return gr.themes.Default(primary_hue="indigo", font=system, font_mono=mono)


def results_table(ranked: Ranked) -> "pd.io.formats.style.Styler":
    """Rank, sentence, score (full precision in the data; 3 decimals and a bar on the page)."""
    frame = pd.DataFrame({"rank": range(1, len(ranked.sentences) + 1), "sentence": ranked.sentences,
                          "score": [float(s) for s in ranked.scores]})
    styler = frame.style.format({"score": "{:.3f}"})
    if ranked.mode == "itm":  # probabilities: a bar from 0 to 1, green at or above 0.5
        styler = styler.map(lambda p: f"background: linear-gradient(90deg, {'#bbf7d0' if p >= 0.5 else '#fecaca'} "
                                      f"{100 * p:.0f}%, transparent {100 * p:.0f}%)", subset=["score"])
    return styler


def _user_error(err: Exception) -> gr.Error:
    return gr.Error(str(err), title="Cannot do that")


def pick_row(event: gr.SelectData):
    """A click on a table row chooses its sentence."""
    return gr.Radio(value=event.row_value[1]) if event.row_value else gr.Radio()


def _file(payload) -> tuple[str | None, str | None]:
    """(path, original name) of an image input's raw payload (the events skip Gradio's own decoding)."""
    if payload is None:
        return None, None
    if isinstance(payload, str):
        return payload, None
    return payload.get("path"), payload.get("orig_name")


def build_app(engine: DemoEngine, *, headline: list[str], report: str, demo_weights: bool,
              examples: list[Example] = (), modes: tuple[str, ...] = ("itm",)) -> gr.Blocks:
    """The page. `headline`: which weights are loaded, a line each (shown on it); `report`: everything the loaders
    said (folded); `demo_weights`: add the bundled-demo warning; `modes`: the score modes the checkpoint offers (a
    switch when there are two)."""

    def match(image, text, mode):
        path, name = _file(image)
        try:
            query = engine.open_image(path, name)
            sentences = parse_sentences(text)
            ranked = engine.rank(query, sentences, mode)
            drawn = engine.draw(query, ranked.sentences[0])
        except LxmertPlError as err:
            raise _user_error(err) from None
        choice = gr.Radio(choices=ranked.sentences, value=ranked.sentences[0], visible=True)
        return results_table(ranked), drawn, choice, f"{WHY_NOTE}\n\n{engine.describe(query)}", [path, name]

    def why(sentence, matched):
        """Redraw the image of the last Match (not whatever the input holds now) for another sentence."""
        if not matched:
            raise gr.Error("press Match first", title="Cannot do that")
        try:
            return engine.draw(engine.open_image(*matched), sentence or None)
        except LxmertPlError as err:
            raise _user_error(err) from None

    # No usage statistics; uploads and drawings older than an hour are removed from Gradio's cache every hour.
    with gr.Blocks(title="LXMERT image-text matching", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown("# LXMERT image–text matching\nDrop an image, type a few sentences (one a line) and press "
                    "**Match**: the sentences come back sorted by how well they match the image, and the picture "
                    "shows the regions the model looked at for the one you choose.")
        gr.Markdown("\n".join(f"- {line}" for line in headline), elem_classes="weights-note", elem_id="weights")
        with gr.Accordion("Everything the loaders said", open=False):
            gr.Code(report, language=None, show_label=False)
        if demo_weights:
            gr.Markdown("**Bundled demo weights.** A tiny model trained on synthetic coloured shapes: its scores mean "
                        "something only on the sample scenes below. For real photos start the demo with "
                        "`--ckpt lxr955 --detector frcnn-vg-finetuned`.", elem_classes="demo-warning")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                image = gr.Image(label="Image", type="filepath", format="png", height=300,
                                 sources=["upload", "clipboard"], elem_id="image")
                text = gr.Textbox(label="Sentences (one a line)", lines=4, elem_id="sentences",
                                  placeholder="a red circle and a small blue star\nthere is a green triangle")
                mode = gr.Radio(choices=[(MODE_NAMES[m], m) for m in modes], value=modes[0], label="Score",
                                visible=len(modes) > 1, elem_id="mode")
                button = gr.Button("Match", variant="primary", elem_id="match")
                if examples:
                    gr.Examples([[str(e.path), e.text] for e in examples], inputs=[image, text],
                                label="Sample scenes (the true caption, then two false ones)", elem_id="examples",
                                examples_per_page=len(examples))
            with gr.Column(scale=7):
                table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["number", "str", "number"],
                                     label="Sentences, best match first", interactive=False, elem_id="results",
                                     column_widths=["10%", "70%", "20%"], wrap=True)
                chosen = gr.Radio(label="Show the regions behind", choices=[], visible=False, elem_id="chosen")
                drawn = gr.Image(label="Regions", show_label=False, type="pil", format="png", interactive=False,
                                 elem_id="drawn")
                note = gr.Markdown(elem_id="note")

        matched = gr.State()  # [path, name] of the image the table and the drawing belong to
        inputs, outputs = [image, text, mode], [table, drawn, chosen, note, matched]
        button.click(match, inputs, outputs, api_name="match", preprocess=False)
        text.submit(match, inputs, outputs, api_name=False, preprocess=False)
        chosen.input(why, [chosen, matched], drawn, api_name="why", preprocess=False)
        table.select(pick_row, None, chosen, api_name=False).then(why, [chosen, matched], drawn, api_name=False,
                                                                  preprocess=False)
    return app


def describe_weights(name: str) -> tuple[str, bool]:
    """("alias (path)" or the path, is it the registry's bundled demo?) for a checkpoint or detector name."""
    from lxmert_pl.registry import resolve_checkpoint

    try:
        resolved = resolve_checkpoint(name, download=False, progress=False)
    except LxmertPlError:
        return str(name), False
    path = resolved.source or str(resolved.path)
    return (f"`{resolved.alias}` ({path})" if resolved.alias else f"`{path}`"), resolved.is_bundled_demo


def load_demo(ckpt: str = "demo-lxrt", detector: str = "demo-frcnn", *, mode: str | None = None,
              device: str = "auto", max_pixels: int | None = None, matcher=None) -> tuple[gr.Blocks, str]:
    """Load the Matcher (or take `matcher`, loaded from `ckpt` and `detector`) and lay out the page; returns (app,
    what the loaders said, for the console)."""
    from lxmert_pl.demo.engine import MAX_PIXELS
    from lxmert_pl.demo.samples import SampleBoxes, load_examples

    if matcher is None:
        from lxmert_pl import Matcher

        matcher = Matcher.from_pretrained(ckpt, detector=detector, device=device, mode=mode or "itm")
    modes = ("itm", "cosine") if matcher.model.has_matching_head else ("cosine",)
    modes = (matcher.mode,) + tuple(m for m in modes if m != matcher.mode)
    (lxrt, demo_lxrt), (frcnn, demo_frcnn) = describe_weights(ckpt), describe_weights(detector)
    headline = [f"LXMERT weights: {lxrt}", f"Detector: {frcnn}",
                f"Scores: {', '.join(MODE_NAMES[m] for m in modes)} · on {matcher.device}"]
    report = str(matcher.report or "(the Matcher did not say)")
    engine = DemoEngine(matcher, SampleBoxes(), max_pixels=max_pixels or MAX_PIXELS, demo_weights=demo_frcnn)
    app = build_app(engine, headline=headline, report=report, demo_weights=demo_lxrt or demo_frcnn,
                    examples=load_examples(), modes=modes)
    return app, report


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the system picks it)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def launch_app(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, quiet: bool = True) -> str:
    """Serve the page without blocking (no share link, no analytics); returns its local URL."""
    app.queue(default_concurrency_limit=1)  # one query at a time: the model is shared
    port = port or free_port(host)
    try:
        _, url, _ = app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True,
                               quiet=quiet, show_error=True, theme=theme(), css=CSS, ssr_mode=False,
                               mcp_server=False, max_file_size="50mb", footer_links=[])
    except OSError:
        raise UserInputError(f"cannot serve on {host}:{port}: the port is taken or the address is not this "
                             "machine's (--port N, 0 for any free port; --host)") from None
    return url
