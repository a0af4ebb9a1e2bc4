"""Training: `loop` (the run: steps, evaluation, checkpoints, metrics), `step` (the pure train step,
its jitted and sharded forms, the train state), `data` and `tokenizers` (Grain pipelines), `optim`
(AdamW and its schedule), `metrics` and `plots` (metrics.jsonl, TensorBoard, loss curves).

    from mosaics_jax.train import loop
    result = loop.train(experiment, "runs/quickstart")
"""
