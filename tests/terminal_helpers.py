"""Commands run with a terminal for their output, as a user at one runs them."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import signal
import struct
import subprocess
import termios


def run_in_terminal(
    command: list[str], interrupt_at: str | None = None, env: dict[str, str] | None = None
) -> tuple[int, list[str]]:
    """Run `command` with a pseudo-terminal 100 columns wide as its stdout and stderr; with
    `interrupt_at`, press Ctrl-C (SIGINT) once its output shows that text. Returns the exit
    status and each line as the terminal shows it: what was written after its last carriage
    return (a progress bar redrawn in place, or cleared)."""
    main_end, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    output = b""
    with subprocess.Popen(command, stdout=terminal, stderr=terminal, env=env) as process:
        os.close(terminal)
        with contextlib.suppress(OSError):  # EIO once the command has ended and closed it
            while chunk := os.read(main_end, 65536):
                output += chunk
                if interrupt_at is not None and interrupt_at.encode() in output:
                    process.send_signal(signal.SIGINT)
                    interrupt_at = None
    os.close(main_end)
    lines = output.decode(errors="replace").split("\n")
    return process.returncode, [line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines]
