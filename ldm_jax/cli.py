"""Flag parsing for the commands that take a config file (`--config=FILE --config.a.b=V`).

ml_collections' config_flags turns an override of a key the config does not have into
three chained tracebacks ending in `AttributeError: "'foo'"`. The commands pass
`parse_flags` to `absl.app.run(main, flags_parser=parse_flags)`: a failure is explained in
one line naming the block that lacks the key and listing the keys it has. Flag errors that
absl reports well itself (a bad integer, a missing required flag) are left to absl.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from absl import app, flags


def parse_flags(argv: list[str], flag_values: flags.FlagValues | None = None,
                name: str = "config") -> list[str]:
  """Parses `argv` like absl's default parser; an unknown or unloadable `--NAME` config
  exits with `error: ...` instead of a traceback."""
  values = flags.FLAGS if flag_values is None else flag_values
  try:
    rest = app.parse_flags_with_usage(argv) if flag_values is None else flag_values(argv)
  except flags.Error:
    raise
  except Exception:  # pylint: disable=broad-except  # config_flags raises whatever it hit
    message = config_error(argv, values, name)
    if message is None:
      raise
    raise SystemExit(f"error: {message}") from None
  config = values[name].value if name in values else None
  try:  # a file that failed to load parses as a stand-in raising on first use
    _ = config is not None and config.keys
  except OSError as e:
    detail = str(e.__cause__ or e).strip().splitlines()[-1].strip()
    raise SystemExit(f"error: --{name}={_config_argument(argv, name)}: cannot load it: "
                     f"{detail}") from None
  return rest


def _config_argument(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    m = re.fullmatch(rf"--?{name}(=(.*))?", arg)
    if m:
      return m[2] if m[1] else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def _overrides(argv: list[str], name: str) -> list[str]:
  return [m[2] for arg in argv if (m := re.match(rf"--?(no)?{name}\.([^=]+)", arg))]


def config_error(argv: list[str], flag_values: flags.FlagValues, name: str = "config"
                 ) -> str | None:
  """Why `--NAME` with its `--NAME.a.b=...` overrides in `argv` cannot parse, or None when
  the reason is none of: a config file that fails to load, an override of a missing key."""
  argv = flag_values.read_flags_from_files(list(argv[1:]), force_gnu=False)
  source = _config_argument(argv, name)
  if not source or name not in flag_values:
    return None
  try:
    config = flag_values[name].parser.parse(source)
  except Exception as e:  # pylint: disable=broad-except  # the config file's own error
    cause = e.__cause__ or e
    return f"--{name}={source}: {type(cause).__name__}: {cause}"
  for path in _overrides(argv, name):
    message = unknown_key(config, path)
    if message is not None:
      return f"--{name}.{path}: {message}"
  return None


def unknown_key(config: Any, path: str) -> str | None:
  """What is wrong with the dotted `path` into `config` (a ConfigDict), or None if it
  names an existing key."""
  node, parts = config, path.split(".")
  for i, part in enumerate(parts):
    block = ".".join(parts[:i])
    if "[" in part:  # config_path's indexing: not checked here
      return None
    if not hasattr(node, "keys"):
      return f"`{block}` is a value ({node!r}), not a block with keys"
    if part not in node:
      keys = sorted(node.keys())
      close = difflib.get_close_matches(part, keys, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      if block:
        return f"the `{block}` block has no key {part!r}{hint}; its keys: {', '.join(keys)}"
      what = "block" if len(parts) > 1 else "key"
      return f"the config has no {what} {part!r}{hint}; its top-level keys: {', '.join(keys)}"
    node = node[part]
  return None
