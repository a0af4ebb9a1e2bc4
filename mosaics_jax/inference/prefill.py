"""Rows through a model in chunks of columns: the first chunk through the training path into a
fresh decode cache, the others through the cache. Generation's prefill and scoring share it.

    class Scorer(prefill.Chunked):
      ...
      outs, cache = self._chunks(params, tokens, segment_ids, lengths, (targets,),
                                 outputs=losses, capacity=64)

Each chunk's outputs are `outputs(logits, lengths in the chunk, *column chunks)`, computed in the
compiled call: a module-level function, since it is a static argument whose identity keys the
compilation.

`check_token_ids` is the one check of token ids for every entry point (prompts, scored rows,
`Pretrained.logits`): under jit an id outside the vocabulary would read another row or NaN.

Axis legend: b = batch, c = chunk, t = row length, v = vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from mosaics_jax import config as config_lib
from mosaics_jax.inference import placement
from mosaics_jax.model import cache as cache_lib, families

Outputs = Callable[..., Any]


def check_token_ids(ids: Int[np.ndarray, " t"], vocab_size: int, name: str) -> None:
  """Raises ValueError naming the first id of `ids` outside [0, vocab_size) and its position;
  `name` says whose ids they are ("prompt 3")."""
  bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
  if bad.size:
    raise ValueError(
        f"{name} holds token id {int(ids[bad[0]])}, outside the model's vocabulary [0,"
        f" {vocab_size}), at position {int(bad[0])}"
    )


def at_last(x: Float[Array, "b c ..."], lengths: Int[Array, " b"]) -> Float[Array, "b ..."]:
  """`x` at each row's last position in the chunk (its first where it has none): of the logits,
  those after the row."""
  return cache_lib.last(x, lengths, x[:, 0])


class Chunked:
  """A model's compiled calls on rows in chunks, shared by generation and scoring."""

  def __init__(
      self,
      model: nn.Module,
      *,
      chunk: int | None,
      mesh: jax.sharding.Mesh | None,
      rules: config_lib.AxisRules,
      model_kwargs: dict[str, Any] | None,
  ):
    """`chunk` columns go in a call, at most the longest input of the model (v1's block_size);
    None: the model's longest input, or whole rows if it has no limit. `model_kwargs` go to every
    call of the model (v2's `ltm_delay`)."""
    self.model = model
    longest = families.of(model.config).max_length(model.config)
    if longest is not None:
      chunk = longest if chunk is None else min(chunk, longest)
    self.chunk = chunk
    self.mesh = mesh
    self.rules = rules
    self.model_kwargs = dict(model_kwargs or {})
    self._first = jax.jit(self._first_fn, static_argnames=("capacity", "outputs"))
    # The cache is donated: a chunk updates it in place instead of copying it.
    self._next = jax.jit(self._next_fn, static_argnames=("outputs",), donate_argnames=("cache",))

  def _apply(
      self, params, tokens: Int[Array, "b c"], segment_ids, cache, lengths=None
  ) -> tuple[Float[Array, "b c v"], cache_lib.Cache]:
    return self.model.apply(
        {"params": params},
        tokens,
        segment_ids,
        cache=cache,
        lengths=lengths,
        **self.model_kwargs,
    )

  def _first_fn(self, params, tokens, segment_ids, lengths, columns, capacity, outputs):
    cache = placement.constrain_cache(self.model.init_cache(tokens.shape[0], capacity))
    return self._next_fn(params, tokens, segment_ids, lengths, columns, cache, outputs)

  def _next_fn(self, params, tokens, segment_ids, lengths, columns, cache, outputs):
    logits, cache = self._apply(params, tokens, segment_ids, cache, lengths)
    return outputs(logits, lengths, *columns), placement.constrain_cache(cache)

  def _step(self, width: int) -> int:
    """The columns of a chunk of rows `width` wide."""
    return width if self.chunk is None else min(self.chunk, width)

  def _chunks(
      self,
      params: Any,
      tokens: Int[np.ndarray, "b t"],
      segment_ids: Int[np.ndarray, "b t"],
      lengths: Int[np.ndarray, " b"],
      columns: Sequence[np.ndarray] = (),
      *,
      outputs: Outputs,
      capacity: int | None = None,
      cache: cache_lib.Cache | None = None,
      keep: Collection[int] | None = None,
  ) -> tuple[list[Any], cache_lib.Cache]:
    """(per chunk, its `outputs`; the cache after the rows): the rows (`lengths` tokens each, the
    rest padding) into a fresh cache of `capacity` tokens per row, or on through `cache`.
    `columns` ([b, t] each) are cut into chunks with the tokens, for `outputs`; only the outputs of
    the chunks numbered in `keep` (default all) are kept, the others are None.

    Raises ValueError if a row went past the cache's max_len (`cache.check`).
    """
    step = self._step(tokens.shape[1])
    outs = []
    for n, i in enumerate(range(0, tokens.shape[1], step)):
      cut = slice(i, i + step)
      part = (
          tokens[:, cut],
          segment_ids[:, cut],
          np.clip(lengths - i, 0, step),
          tuple(column[:, cut] for column in columns),
      )
      if cache is None:
        out, cache = self._first(params, *part, capacity=capacity, outputs=outputs)
      else:
        out, cache = self._next(params, *part, cache=cache, outputs=outputs)
      outs.append(out if keep is None or n in keep else None)
    cache_lib.check(cache)
    return outs, cache

  def _ends(
      self,
      params: Any,
      tokens: Int[np.ndarray, "b t"],
      segment_ids: Int[np.ndarray, "b t"],
      lengths: Int[np.ndarray, " b"],
      *,
      capacity: int,
      outputs: Outputs = at_last,
  ) -> tuple[Any, cache_lib.Cache]:
    """(`outputs` at each row's last token, [b, ...]; the cache of the rows): a prefill.
    `outputs` gives one output per row of a chunk, at the row's last position in it."""
    ends = (np.maximum(lengths, 1) - 1) // self._step(tokens.shape[1])
    outs, cache = self._chunks(
        params,
        tokens,
        segment_ids,
        lengths,
        outputs=outputs,
        capacity=capacity,
        keep=set(ends.tolist()),
    )
    if (ends == ends[0]).all():
      return outs[ends[0]], cache
    # Each row's output from the chunk its prompt ends in; only those chunks' outputs are kept.
    return jnp.stack([outs[end][row] for row, end in enumerate(ends)]), cache
