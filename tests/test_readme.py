"""The README's example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'


def test_readme_example_runs_and_reports_metrics():
  code = re.findall(r'```python\n(.*?)```', README.read_text(), re.S)[0]
  namespace = {}
  exec(compile(code, str(README), 'exec'), namespace)  # noqa: S102
  metrics = namespace['metrics']
  assert float(metrics['loss']) == 1.0
  assert not bool(metrics['skipped'])
  assert float(metrics['grad_norm']) > 0
