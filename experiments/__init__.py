"""Experiment files: each module declares `EXPERIMENTS`, a tuple of `mosaics_jax.config.Experiment`.

Experiments only declare configs; `mosaics_jax.registry` finds them by name.
"""
