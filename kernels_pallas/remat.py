"""The checkpoint name of what the retrieval ops keep for their backward pass.

Each retrieval op with a backward pass of its own (`retrieve` on the XLA path and the Pallas
kernels, `retrieve_selected` on the XLA path, `retrieve_persistent`) tags its output and what its
backward reads beyond its inputs (each row's max and sum; the single-block path's masked scores;
the selected blocks) with `jax.ad_checkpoint.checkpoint_name(x, NAME)`. Under

    jax.checkpoint(f, policy=jax.checkpoint_policies.save_only_these_names(NAME))

the backward pass of f then reads them instead of running the retrieval forward again: naming the
op's output outside it would not do, as the residuals of a custom backward pass are made inside
it. The Pallas kernels' forward runs in a jit of its own, which the recomputation then drops
whole (a bare pallas_call is never dead-code eliminated). Outside a checkpoint the names change
nothing. The "reference" and "shift" implementations,
differentiated by autodiff or by a library, leave their residuals unnamed.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.ad_checkpoint import checkpoint_name

NAME = "retrieval"


def named(tree: Any) -> Any:
  """Every array of `tree`, tagged with NAME (an identity outside `jax.checkpoint`)."""
  return jax.tree.map(lambda x: checkpoint_name(x, NAME), tree)
