"""optax_guard: keep JAX/Optax training alive through bad steps.

Users write ``import optax_guard as og``. The package has three layers, one
folder each:

* :mod:`optax_guard.transforms`: per-step Optax transformations (guard,
  clipping, loss scaling) and the code that reads their state (``metrics``,
  ``diagnose``); they import only jax, optax and chex.
* :mod:`optax_guard.train_step`: the jit-compiled train steps.
* :mod:`optax_guard.host`: what runs on the host and outlives a process
  (checkpoints, recovery, the ``fit`` loop, grain data pipelines).

State classes and the less common helpers stay importable from their modules;
fault injection for tests is :mod:`optax_guard.testing`.
"""

from optax_guard.host.checkpoint import Checkpointer
from optax_guard.host.checkpoint import TrainState
from optax_guard.host.data import batches
from optax_guard.host.fit import fit
from optax_guard.host.flax_models import flax_fit_step
from optax_guard.host.flax_models import flax_state
from optax_guard.host.flax_models import nnx_fit_step
from optax_guard.host.flax_models import nnx_update
from optax_guard.host.recovery import RecoveryPolicy
from optax_guard.host.recovery import scale_hyperparam
from optax_guard.host.recovery import TrainingDiverged
from optax_guard.host.report import plot_runs
from optax_guard.host.report import read_run_log
from optax_guard.train_step import apply_gradients
from optax_guard.train_step import make_nnx_train_step
from optax_guard.train_step import make_train_step
from optax_guard.transforms.accumulate import accumulate
from optax_guard.transforms.clipping import agc
from optax_guard.transforms.clipping import autoclip
from optax_guard.transforms.clipping import clip_by_global_norm
from optax_guard.transforms.clipping import zclip
from optax_guard.transforms.diagnostics import diagnose
from optax_guard.transforms.guard import guard
from optax_guard.transforms.guard import skip_nonfinite
from optax_guard.transforms.guard import skip_spikes
from optax_guard.transforms.loss_scale import dynamic_loss_scale
from optax_guard.transforms.loss_scale import loss_scale
from optax_guard.transforms.metrics import metrics
from optax_guard.transforms.numerics import global_norm

__version__ = '0.1.0'

__all__ = (
    'Checkpointer',
    'RecoveryPolicy',
    'TrainState',
    'TrainingDiverged',
    'accumulate',
    'agc',
    'apply_gradients',
    'autoclip',
    'batches',
    'clip_by_global_norm',
    'diagnose',
    'dynamic_loss_scale',
    'fit',
    'flax_fit_step',
    'flax_state',
    'global_norm',
    'guard',
    'loss_scale',
    'make_nnx_train_step',
    'make_train_step',
    'metrics',
    'nnx_fit_step',
    'nnx_update',
    'plot_runs',
    'read_run_log',
    'scale_hyperparam',
    'skip_nonfinite',
    'skip_spikes',
    'zclip',
)
