"""Weights in and out: `pretrained` (`mosaics_jax.load`, the exported directory format), `layout`
(Flax params <-> PyTorch names and shapes), `nanomosaics` (the official v1 code's checkpoints), and
`torch_models` (PyTorch versions of every family, for exported weights; needs torch).
"""
