"""A tiny character-level transformer language model in Flax NNX."""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Size of the :class:`TinyTransformer`."""

  vocab_size: int
  seq_len: int = 64
  width: int = 96
  depth: int = 2
  heads: int = 4
  mlp_ratio: int = 4


class Block(nnx.Module):
  """Pre-LayerNorm causal self-attention and MLP, each with a residual."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    width = config.width
    self.attention_norm = nnx.LayerNorm(width, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        num_heads=config.heads, in_features=width, decode=False,
        keep_rngs=False, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(width, rngs=rngs)
    self.mlp_in = nnx.Linear(width, config.mlp_ratio * width, rngs=rngs)
    self.mlp_out = nnx.Linear(config.mlp_ratio * width, width, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x), mask=mask)
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(x))))


class TinyTransformer(nnx.Module):
  """A GPT-style decoder: token and position embeddings, blocks, logits.

  Examples:
    >>> from flax import nnx
    >>> from optax_guard.demo.model import ModelConfig, TinyTransformer
    >>> import jax.numpy as jnp
    >>> config = ModelConfig(vocab_size=10, seq_len=8)
    >>> model = nnx.jit(lambda: TinyTransformer(config, rngs=nnx.Rngs(0)))()
    >>> nnx.jit(lambda m, x: m(x))(model, jnp.zeros((2, 8), jnp.int32)).shape
    (2, 8, 10)
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.token_embedding = nnx.Embed(config.vocab_size, config.width, rngs=rngs)
    self.position_embedding = nnx.Embed(config.seq_len, config.width, rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs) for _ in range(config.depth)])
    self.final_norm = nnx.LayerNorm(config.width, rngs=rngs)
    self.head = nnx.Linear(config.width, config.vocab_size, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    positions = jnp.arange(tokens.shape[-1])
    x = self.token_embedding(tokens) + self.position_embedding(positions)
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.final_norm(x))


def token_losses(model: TinyTransformer, tokens: jax.Array) -> jax.Array:
  """Next-character cross-entropy of every position, ``[batch, seq_len]``."""
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), tokens[:, 1:])


def loss_fn(model: TinyTransformer, batch: dict[str, jax.Array]) -> jax.Array:
  """The mean over targets of ``weights * cross_entropy`` (clean data has
  unit weights; the demo's faults scale or poison them)."""
  return jnp.mean(batch['weights'] * token_losses(model, batch['tokens']))


def make_loss_fn(graphdef: nnx.GraphDef):
  """:func:`loss_fn` of the parameters (an ``nnx.State``): a plain step's."""
  return lambda params, batch: loss_fn(nnx.merge(graphdef, params), batch)
