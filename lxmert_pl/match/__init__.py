"""`python -m lxmert_pl.match IMAGE "sentence" ["sentence" ...]`: score sentences against one image (see
`__main__.py`; the Python API is `lxmert_pl.Matcher`)."""
