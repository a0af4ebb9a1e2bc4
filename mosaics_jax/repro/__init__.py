"""Reproductions of the papers' claims: declared as data in `experiments/` (`declaration`), planned
and costed (`plan`), run and resumed (`runner`), and reported with a verdict (`report`).

`mosaics-repro NAME --workdir DIR` is the command line (`mosaics_jax.cli.repro`).
"""
