"""The models: one module per family (`mm1`, `mm1_library`, `mm2`, `llama`, `gpt2`) holding its
Flax model and its facts (`family.Family`), built from shared parts: `layers` (initialisers,
logical axes, SwiGLU, RoPE, sharded retrieval), `features` (key and value extractors), `bandwidth`
(v2's adaptive bandwidth), `memories` (the associative memories), `attention` (Llama's), and `lm`
(embeddings, norms, the decoder frame). `families` finds a family by name or config and builds its
model.

Models know nothing of training, inference, evaluation or porting: they import only the configs
and `kernels_pallas`.
"""
