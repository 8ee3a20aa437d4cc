"""optax_guard: keep JAX/Optax training alive through bad steps.

Users write ``import optax_guard as og``.
"""

from optax_guard._clipping import agc
from optax_guard._clipping import AGCState
from optax_guard._clipping import autoclip
from optax_guard._clipping import AutoClipState
from optax_guard._clipping import clip_by_global_norm
from optax_guard._clipping import ClipByGlobalNormState
from optax_guard._clipping import ClipStats
from optax_guard._clipping import zclip
from optax_guard._clipping import ZClipState
from optax_guard._diagnostics import diagnose
from optax_guard._diagnostics import Diagnosis
from optax_guard._guard import guard
from optax_guard._guard import GuardState
from optax_guard._guard import skip_nonfinite
from optax_guard._guard import skip_spikes
from optax_guard._guard import SpikeWindow
from optax_guard._loss_scale import dynamic_loss_scale
from optax_guard._loss_scale import loss_scale
from optax_guard._loss_scale import LossScaleState
from optax_guard._metrics import metrics
from optax_guard._numerics import global_norm
from optax_guard._numerics import norm_stats
from optax_guard._numerics import NormStats
from optax_guard._train import make_nnx_train_step
from optax_guard._train import make_train_step
from optax_guard import checkpoint
from optax_guard import faults
from optax_guard.checkpoint import Checkpointer
from optax_guard.checkpoint import CorruptCheckpointError
from optax_guard.checkpoint import CorruptCheckpointWarning
from optax_guard.checkpoint import TrainState
from optax_guard.data import ShuffledBatches
from optax_guard.fit import EventLog
from optax_guard.fit import fit
from optax_guard.fit import FitResult
from optax_guard.fit import PreemptionHandler
from optax_guard.fit import RunLogger
from optax_guard.recovery import DivergenceReport
from optax_guard.recovery import Recovery
from optax_guard.recovery import RecoveryPolicy
from optax_guard.recovery import scale_hyperparam
from optax_guard.recovery import TrainingDiverged
from optax_guard.recovery import worst_leaves

__version__ = '0.1.0'

__all__ = (
    'AGCState',
    'AutoClipState',
    'Checkpointer',
    'ClipByGlobalNormState',
    'ClipStats',
    'CorruptCheckpointError',
    'CorruptCheckpointWarning',
    'Diagnosis',
    'DivergenceReport',
    'EventLog',
    'FitResult',
    'GuardState',
    'LossScaleState',
    'NormStats',
    'PreemptionHandler',
    'Recovery',
    'RecoveryPolicy',
    'RunLogger',
    'ShuffledBatches',
    'SpikeWindow',
    'TrainState',
    'TrainingDiverged',
    'ZClipState',
    'agc',
    'autoclip',
    'checkpoint',
    'clip_by_global_norm',
    'diagnose',
    'dynamic_loss_scale',
    'faults',
    'fit',
    'global_norm',
    'guard',
    'loss_scale',
    'make_nnx_train_step',
    'make_train_step',
    'metrics',
    'norm_stats',
    'scale_hyperparam',
    'skip_nonfinite',
    'skip_spikes',
    'worst_leaves',
    'zclip',
)
