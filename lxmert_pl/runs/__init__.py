"""The run layer: what `eval.py`, `train.py`, `extract.py` and the `python -m lxmert_pl.*` commands run.

Config composition (`config`), the command-line helper (`cli`), console messages (`console`), the LightningModule
(`module`), loggers, checkpoints, output files, and one module per run (`evaluate`, `training`, ...). The library
(`model/`, `features/`, `detector/`, `pairs/`, `data/`, `scoring`, `metrics`, ...) never imports from here.
"""
