"""One process of the two-process attribution run (tests/test_attribution_multihost.py).

Trains the model of ``examples/multihost_train.py`` with ``og.fit`` and
``RecoveryPolicy(rerun=True)`` over a global mesh of both processes. The
batch of step 5 has a NaN in process 1's rows only (a bad batch: process 0
never sees its NaN, yet both must blame the batch and agree on its hash);
the gradient of call 9 (step 8) is corrupted once on the host that runs the
flaky device's callback (a transient fault). Writes the events of this
process as JSON.

    python tests/attribution_worker.py COORDINATOR PROCESS_ID DIR OUT.json
"""

import json
import sys

import jax


def main():
  coordinator, process_id, directory, out = sys.argv[1:]
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', 2)
  jax.distributed.initialize(coordinator_address=coordinator,
                             num_processes=2, process_id=int(process_id),
                             initialization_timeout=60)
  # After initialize: the example builds the global mesh at import time no
  # more, but keep JAX's first use behind the cluster set-up anyway.
  import optax  # pylint: disable=g-import-not-at-top

  import optax_guard as og  # pylint: disable=g-import-not-at-top
  from examples import multihost_train as example  # pylint: disable=g-import-not-at-top
  from optax_guard import testing  # pylint: disable=g-import-not-at-top

  try:
    tx = og.guard(optax.adam(1e-2))
    mesh, params, opt_state = example._setup(tx)  # pylint: disable=protected-access
    data = example.GlobalBatches(mesh, nan_steps=[4], nan_row=-1)
    flaky = testing.FlakyDevice({9: testing.Fault('nan_grad')})
    step = og.make_train_step(flaky.wrap(example._loss_fn), tx)  # pylint: disable=protected-access
    events = []
    with og.Checkpointer(directory, save_interval_steps=4) as checkpointer:
      result = og.fit(
          step, og.TrainState(0, params, opt_state), data, num_steps=10,
          checkpointer=checkpointer, recovery=og.RecoveryPolicy(rerun=True),
          progress=False,
          callback=lambda s, m, e: events.extend(
              event.to_json() for event in e if event.kind != 'saved'))
    with open(out, 'w') as f:
      json.dump({'events': events, 'step': result.state.step,
                 'nan_here': data.nan_here,
                 'params': {k: v.tolist() for k, v in jax.device_get(
                     result.state.params).items()}}, f)
  finally:
    jax.distributed.shutdown()


if __name__ == '__main__':
  main()
