"""cartlorem's benchmark studies: :mod:`benchmarks.harness` (shared helpers) and one script per study.

    python benchmarks/speed.py --quick        # inference time and memory vs MACE
    python benchmarks/accuracy.py --quick     # accuracy at equal budget vs MACE
    python benchmarks/long_range.py --quick   # short range vs lorem vs multipole

Data sets are read from ``--data-dir`` (default ``../shared/data`` next to the project); results go
to ``benchmarks/results/`` (JSON, Markdown, PNG; trained models are not committed). See README.md.
"""
