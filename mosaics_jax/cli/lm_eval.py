"""`mosaics-lm-eval`: EleutherAI's lm-evaluation-harness command line, with our models as
`--model mosaics` (`mosaics_jax.eval.lm_harness`).

    mosaics-lm-eval --model mosaics --model_args path=runs/mm2-char --tasks lambada_openai \\
        --batch_size 8
    mosaics-lm-eval --model mosaics --model_args path=runs/mm2,drop_long_term_memory=true \\
        --tasks my_task --include_path tasks/ --output_path results/

Every flag is lm-eval's (`mosaics-lm-eval run --help`): lm-eval finds a model by name only once
the module that registers it is imported, and reads no entry points of other packages, so
`lm_eval --model mosaics` does not know the name. Needs the `eval` extra: pip install
'mosaics-jax[eval]'. A model or a setting we cannot evaluate exits with code 2 and says why.
"""

from __future__ import annotations

import sys

from mosaics_jax.cli import common
from mosaics_jax.eval import harness as harness_lib


def main(argv: list[str] | None = None) -> int:
  try:
    from mosaics_jax.eval import lm_harness  # pylint: disable=import-outside-toplevel  # Optional.
  except ImportError as e:
    return common.fail("mosaics-lm-eval", e)
  try:
    return lm_harness.command_line(argv)
  except (harness_lib.EvalError, *common.READ_ERRORS) as e:
    return common.fail("mosaics-lm-eval", e)


if __name__ == "__main__":
  sys.exit(main())
