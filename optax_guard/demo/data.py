"""Real English text that ships with Python, as character-level LM batches.

The corpus is the standard library's ``pydoc_data.topics``: the ~460 kB of
reference text behind ``help('assert')`` and friends. Nothing is downloaded.
"""

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The text split into train and held-out token ids over a char vocabulary.

  Attributes:
    vocab: every character of the text, sorted; a token is an index into it.
    train: token ids of the first part of the text.
    heldout: token ids of the last ``heldout_fraction`` of the text.
  """

  vocab: str
  train: np.ndarray
  heldout: np.ndarray

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def decode(self, tokens) -> str:
    return ''.join(self.vocab[int(t)] for t in tokens)


def load_corpus(heldout_fraction: float = 0.1) -> Corpus:
  """Loads ``pydoc_data.topics`` (topics in sorted order) as a :class:`Corpus`.

  Examples:
    >>> from optax_guard.demo.data import load_corpus
    >>> corpus = load_corpus()
    >>> corpus.decode(corpus.train[:10])
    'The "asser'
  """
  if not 0 < heldout_fraction < 1:
    raise ValueError(
        f'heldout_fraction must be in (0, 1), got {heldout_fraction!r}.'
    )
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  text = '\n'.join(topics.topics[name] for name in sorted(topics.topics))
  vocab = ''.join(sorted(set(text)))
  lookup = {char: index for index, char in enumerate(vocab)}
  ids = np.array([lookup[char] for char in text], dtype=np.int32)
  split = int(len(ids) * (1 - heldout_fraction))
  return Corpus(vocab=vocab, train=ids[:split], heldout=ids[split:])


def batch_at(
    tokens: np.ndarray, position: int, *, batch_size: int, seq_len: int,
    seed: int,
) -> dict[str, np.ndarray]:
  """The batch number ``position`` of a stream: random windows of the text.

  A batch depends only on ``(seed, position)``, so any position can be
  re-read, skipped to or resumed from without replaying the stream.

  Returns:
    ``{'tokens': int32[batch_size, seq_len + 1], 'weights':
    float32[batch_size, seq_len]}``: inputs are ``tokens[:, :-1]``, targets
    ``tokens[:, 1:]``, and ``weights`` scale each target's loss (all ones
    for clean data).
  """
  rng = np.random.default_rng((seed, position))
  starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
  windows = tokens[starts[:, None] + np.arange(seq_len + 1)]
  return {
      'tokens': windows.astype(np.int32),
      'weights': np.ones((batch_size, seq_len), np.float32),
  }


class BatchIterator:
  """Deterministic, resumable batches of a token stream.

  Its whole state is the position in the stream (``get_state`` /
  ``set_state``, as grain's iterators have), so a checkpoint that saves it
  resumes on exactly the batch that came next.

  Examples:
    >>> import numpy as np
    >>> from optax_guard.demo.data import BatchIterator
    >>> it = BatchIterator(np.arange(100), batch_size=2, seq_len=4, seed=0)
    >>> first = next(it)
    >>> state = it.get_state()
    >>> second = next(it)
    >>> it.set_state(state)
    >>> bool((next(it)['tokens'] == second['tokens']).all()), state
    (True, {'position': 1})
  """

  def __init__(
      self, tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int
  ):
    if batch_size < 1 or seq_len < 1:
      raise ValueError(
          f'batch_size and seq_len must be >= 1, got {batch_size} and'
          f' {seq_len}.'
      )
    if len(tokens) <= seq_len + 1:
      raise ValueError(
          f'the text ({len(tokens)} tokens) is shorter than seq_len + 2.'
      )
    self.tokens = tokens
    self.batch_size = batch_size
    self.seq_len = seq_len
    self.seed = seed
    self.position = 0

  def __iter__(self) -> 'BatchIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = batch_at(
        self.tokens, self.position, batch_size=self.batch_size,
        seq_len=self.seq_len, seed=self.seed,
    )
    self.position += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'position': self.position}

  def set_state(self, state: dict[str, Any]) -> None:
    self.position = int(state['position'])
