"""Secrets that desired.yaml names but never holds: an environment variable or a 0600 file."""
from __future__ import annotations

import os
import stat
from pathlib import Path


class SecretUnavailable(Exception):
    """The named secret cannot be read; the message says which and why."""


def read_secret(env: str | None = None, file: Path | None = None, what: str = "") -> str:
    """The value of environment variable ``env``, else the content of ``file`` (stripped).

    A file that group or others can read is refused: a secret must not be one ``chmod`` away
    from every local user.
    """
    named = f" ({what})" if what else ""
    if env:
        value = os.environ.get(env)
        if value is None:
            raise SecretUnavailable(f"environment variable {env}{named} is not set")
        if not value.strip():
            raise SecretUnavailable(f"environment variable {env}{named} is empty")
        return value
    if file is None:
        raise SecretUnavailable(f"no environment variable or file is named{named}")
    try:
        if file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretUnavailable(f"{file}{named} is readable by group or others; chmod 600 it")
        return file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SecretUnavailable(f"cannot read {file}{named}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SecretUnavailable(f"{file}{named} is not UTF-8 text") from None
