"""Real English text that ships with Python, as character-level LM batches.

The corpus is the standard library's ``pydoc_data.topics``: the ~460 kB of
reference text behind ``help('assert')`` and friends. Nothing is downloaded.
The text is cut into windows of ``seq_len + 1`` characters, which
:func:`optax_guard.batches` shuffles into restorable grain batches.
"""

from typing import Any

import dataclasses

import numpy as np

import optax_guard as og


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The text as token ids over a character vocabulary.

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


def windows(tokens: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """Consecutive, non-overlapping examples of ``seq_len + 1`` tokens.

  Returns:
    ``{'tokens': int32[n, seq_len + 1], 'weights': float32[n, seq_len]}``:
    inputs are ``tokens[:, :-1]``, targets ``tokens[:, 1:]``; ``weights``
    scale each target's loss (ones; a fault may scale them).

  Examples:
    >>> import numpy as np
    >>> from optax_guard.demo.data import windows
    >>> windows(np.arange(10), seq_len=3)['tokens'].tolist()
    [[0, 1, 2, 3], [4, 5, 6, 7]]
  """
  count = len(tokens) // (seq_len + 1)
  if count < 1:
    raise ValueError(
        f'the text ({len(tokens)} tokens) is shorter than seq_len + 1.')
  cut = np.asarray(tokens[:count * (seq_len + 1)], np.int32)
  return {
      'tokens': cut.reshape(count, seq_len + 1),
      'weights': np.ones((count, seq_len), np.float32),
  }


def train_batches(corpus: Corpus, *, batch_size: int, seq_len: int,
                  seed: int) -> Any:
  """Shuffled training batches: a grain iterator (``get_state`` / ``set_state``)."""
  return og.batches(windows(corpus.train, seq_len), batch_size,
                            seed=seed)
