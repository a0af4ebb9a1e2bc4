"""Inference: `sampling` (greedy, temperature, top-k, top-p), `generate` (prefill in one
parallel pass, then a decode loop on device over the models' decode caches, `model/cache.py`) and
`score` (log-probabilities of rows of any length). Both run rows through the model in chunks
(`prefill`) and place parameters and caches on a mesh (`placement`).

    new_tokens = generate.Generator(model)(params, [[1, 2, 3], [4, 5]], max_new_tokens=32)

Inference needs no optimizer and never imports training.
"""
