"""Worker processes for the multi-process tests (JAX on 127.0.0.1)."""

import socket
import subprocess


def coordinator_address() -> str:
  """``127.0.0.1:<port>`` with a port free right now."""
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return f'127.0.0.1:{sock.getsockname()[1]}'


def run_together(commands, *, env, timeout) -> list[tuple[int, str]]:
  """Starts every command, waits for all; ``[(return code, output)]``.

  A process still running after ``timeout`` seconds (one waiting in a
  barrier for a peer that died) is killed, so no test leaves one behind.
  """
  processes = [
      subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
      for command in commands
  ]
  try:
    outputs = [process.communicate(timeout=timeout)[0]
               for process in processes]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  return [(process.returncode, output)
          for process, output in zip(processes, outputs)]
