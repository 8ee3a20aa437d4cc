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

__version__ = '0.1.0'

__all__ = (
    'AGCState',
    'AutoClipState',
    'ClipByGlobalNormState',
    'ClipStats',
    'Diagnosis',
    'GuardState',
    'LossScaleState',
    'NormStats',
    'SpikeWindow',
    'ZClipState',
    'agc',
    'autoclip',
    'clip_by_global_norm',
    'diagnose',
    'dynamic_loss_scale',
    'global_norm',
    'guard',
    'loss_scale',
    'make_nnx_train_step',
    'make_train_step',
    'metrics',
    'norm_stats',
    'skip_nonfinite',
    'skip_spikes',
    'zclip',
)
