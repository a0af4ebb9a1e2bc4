"""Inference: `sampling` (greedy, temperature, top-k, top-p) and `generate` (prefill in one
parallel pass, then a decode loop on device over the models' decode caches, `model/cache.py`).

    new_tokens = generate.generate(model, params, [[1, 2, 3], [4, 5]], max_new_tokens=32)

Inference needs no optimizer and never imports training.
"""
