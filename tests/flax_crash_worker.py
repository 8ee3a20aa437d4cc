"""A Flax model trained by og.fit, for the SIGKILL tests (a subprocess).

Usage: python flax_crash_worker.py FORM CHECKPOINT_DIR RESULT_FILE NUM_STEPS
[CACHE_DIR]

FORM is one of tests/test_fit_model_state.py's FORMS (linen, nnx,
flax_train_state): a BatchNorm model over data with a NaN batch, async
checkpoints every 4 steps. Prints ``step N`` after every step and ``saved N``
when an async save was handed to Orbax; on completion writes the final
params and model state to RESULT_FILE (.npz).
"""

import sys

import jax
import numpy as np

import optax_guard as og
from tests.crash_worker import AnnouncingCheckpointer
from tests.test_fit_model_state import FORMS, _data, _pure


def main(form, directory, result_file, num_steps):
  step, state = FORMS[form]()
  with AnnouncingCheckpointer(directory, save_interval_steps=4,
                              max_to_keep=2) as ckpt:
    result = og.fit(
        step, state, _data(), num_steps=num_steps, checkpointer=ckpt,
        recovery=og.RecoveryPolicy(), progress=False,
        callback=lambda state, m, e: print(f'step {state.step}', flush=True))
  leaves = jax.tree_util.tree_flatten_with_path(
      (_pure(result.state.params), _pure(result.state.model_state)))[0]
  np.savez(result_file, step=result.state.step, **{
      jax.tree_util.keystr(path): leaf for path, leaf in leaves})
  print('done', flush=True)


if __name__ == '__main__':
  if len(sys.argv) > 5:  # A shared compilation cache: cheaper restarts.
    jax.config.update('jax_compilation_cache_dir', sys.argv[5])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
