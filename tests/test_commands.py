"""The command modules hold flags only; everything a test or a user imports lives elsewhere.

absl flags are process-global: two commands that both define --workdir cannot be imported into
one process, so a library function left inside a command module breaks whoever imports two of
them (as a test session does).
"""

import importlib
import pkgutil

from absl import flags

import ldm_jax

COMMANDS = {"ldm_jax.main", "ldm_jax.sample", "ldm_jax.export", "ldm_jax.evaluate",
            "ldm_jax.cache_latents", "ldm_jax.eval.reference_stats"}


def test_only_command_modules_define_flags():
  names = [m.name for m in pkgutil.walk_packages(ldm_jax.__path__, "ldm_jax.")]
  assert COMMANDS <= set(names)
  for name in sorted(set(names) - COMMANDS):
    importlib.import_module(name)
  defining = {module for module in flags.FLAGS.flags_by_module_dict()
              if module.startswith("ldm_jax")}
  assert not defining, f"library modules define absl flags: {sorted(defining)}"
