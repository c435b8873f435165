"""The persistent JAX compilation cache the CLIs (chat, evaluate, train) turn on, so a second run starts fast.

Where compiled programs are kept, first match wins:
  1. `JAX_COMPILATION_CACHE_DIR` (or `jax_compilation_cache_dir` already set in jax.config): JAX's own
     setting is left exactly as it is;
  2. `KANGAROO_JAX_CACHE_DIR`: that folder; the empty string turns the cache off;
  3. `$XDG_CACHE_HOME/kangaroo_jax/jax`, by default `~/.cache/kangaroo_jax/jax`.
Programs that took at least `DEFAULT_MIN_COMPILE_SECS` to compile are written (JAX's own default, 1 s, would
skip some of chat's smaller programs); `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` overrides it.

The folder only ever holds JAX's cache entries and grows without a limit; deleting it is always safe (the
next run compiles again). JAX treats the cache as trusted code: do not point it at a folder others can write.
A folder that cannot be created or written prints one warning and the run goes on without a cache.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Mapping

DIR_ENV = "KANGAROO_JAX_CACHE_DIR"
JAX_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
MIN_SECS_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
DEFAULT_MIN_COMPILE_SECS = 0.5
# --help epilog of the CLIs other than chat (whose --help documents the cache in full).
HELP_EPILOG = (
    "compiled programs are cached between runs as for python -m kangaroo_jax.chat\n"
    f"(see its --help; {DIR_ENV}= turns the cache off)"
)


def default_dir(environ: Mapping[str, str] = os.environ) -> str:
  """`$XDG_CACHE_HOME/kangaroo_jax/jax`; a relative or unset XDG_CACHE_HOME means `~/.cache` (XDG rule)."""
  base = environ.get("XDG_CACHE_HOME", "")
  if not os.path.isabs(base):
    base = os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "kangaroo_jax", "jax")


def resolve_dir(environ: Mapping[str, str] = os.environ, configured: str | None = None) -> tuple[str | None, str]:
  """(folder or None for no cache, where that choice came from) under the rules of the module docstring.

  configured: `jax.config.jax_compilation_cache_dir` as it stands (JAX reads JAX_COMPILATION_CACHE_DIR into it).
  """
  if configured or environ.get(JAX_DIR_ENV):
    return configured or environ[JAX_DIR_ENV], JAX_DIR_ENV
  if DIR_ENV in environ:
    value = environ[DIR_ENV]
    return (os.path.expanduser(value) if value else None), DIR_ENV
  return default_dir(environ), "default"


def _usable(folder: str) -> str | None:
  """None when `folder` is (or was made) a writable directory, else the reason it cannot be used."""
  if "://" in folder:  # gs:// and the like: JAX opens those itself
    return None
  try:
    os.makedirs(folder, mode=0o700, exist_ok=True)
  except OSError as e:
    return e.strerror or type(e).__name__
  if not os.path.isdir(folder):
    return "not a folder"
  if not os.access(folder, os.W_OK | os.X_OK):
    return "not writable"
  return None


def enable(
    environ: Mapping[str, str] = os.environ,
    warn: Callable[[str], None] = lambda s: print(f"warning: {s}", file=sys.stderr, flush=True),
) -> str | None:
  """Turns the persistent cache on for this process; returns its folder, or None when it stays off.

  Call it at the start of a CLI, before anything is compiled: JAX opens the cache at the first compile,
  and a folder set later is never used by this process.
  """
  import jax

  folder, source = resolve_dir(environ, jax.config.jax_compilation_cache_dir)
  if folder is None or not jax.config.jax_enable_compilation_cache:  # JAX_ENABLE_COMPILATION_CACHE=false wins
    return None
  if source != JAX_DIR_ENV:
    problem = _usable(folder)
    if problem is not None:
      warn(
          f"compilation cache {folder} ({source if source != 'default' else 'the default folder'}): {problem}; "
          f"running without it (set {DIR_ENV} to another folder, or to '' to silence this)"
      )
      return None
    jax.config.update("jax_compilation_cache_dir", folder)
  if MIN_SECS_ENV not in environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", DEFAULT_MIN_COMPILE_SECS)
  return folder
