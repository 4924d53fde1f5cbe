"""The interactive demo page: `python -m lxmert_pl.demo` (Gradio, the `demo` extra: `pip install -e '.[demo]'`).

`engine.py` does the work through one `lxmert_pl.Matcher` (checks, scores, drawings) and needs no Gradio;
`app.py` lays out the page; `samples.py` knows the bundled sample scenes (the examples and their boxes).
"""
