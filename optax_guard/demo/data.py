"""Real English text that ships with Python, as character-level LM batches.

The corpus is the standard library's ``pydoc_data.topics``: the ~460 kB of
reference text behind ``help('assert')``. Nothing is downloaded.
"""

import dataclasses

import numpy as np

import optax_guard as og


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Token ids (indices into ``vocab``, the sorted characters of the text)
  of the training text and of the held-out last tenth."""

  vocab: str
  train: np.ndarray
  heldout: np.ndarray

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def decode(self, tokens) -> str:
    return ''.join(self.vocab[int(t)] for t in tokens)


def load_corpus() -> Corpus:
  """``pydoc_data.topics`` (topics in sorted order) as a :class:`Corpus`.

  Examples:
    >>> from optax_guard.demo.data import load_corpus
    >>> corpus = load_corpus()
    >>> corpus.decode(corpus.train[:10])
    'The "asser'
  """
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  text = '\n'.join(topics.topics[name] for name in sorted(topics.topics))
  vocab = ''.join(sorted(set(text)))
  lookup = {char: index for index, char in enumerate(vocab)}
  ids = np.array([lookup[char] for char in text], dtype=np.int32)
  split = int(len(ids) * 0.9)
  return Corpus(vocab=vocab, train=ids[:split], heldout=ids[split:])


def windows(tokens: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """Consecutive examples of ``seq_len + 1`` tokens (inputs ``[:, :-1]``,
  targets ``[:, 1:]``) and a unit loss weight per target (a fault may
  scale them).

  Examples:
    >>> import numpy as np
    >>> from optax_guard.demo.data import windows
    >>> windows(np.arange(10), seq_len=3)['tokens'].tolist()
    [[0, 1, 2, 3], [4, 5, 6, 7]]
  """
  count = len(tokens) // (seq_len + 1)
  cut = np.asarray(tokens[:count * (seq_len + 1)], np.int32)
  return {'tokens': cut.reshape(count, seq_len + 1),
          'weights': np.ones((count, seq_len), np.float32)}


def train_batches(corpus: Corpus, *, batch_size: int, seq_len: int, seed: int):
  """Shuffled, restorable training batches (:func:`optax_guard.batches`)."""
  return og.batches(windows(corpus.train, seq_len), batch_size, seed=seed)
