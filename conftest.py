"""Test set-up shared by tests/, doctests in titanax/ and the docs: 8 simulated CPU
devices, and a persistent compilation cache and Python bytecode inside the clone."""

import os
import sys

os.environ.setdefault("NPROC", "32")  # see titanax/__init__.py: CPU collectives need threads

# Bytecode for what is imported from here on (jax, orbax, titanax...), kept in the clone and
# read by every Python process the tests start (examples, `titanax launch` and its ranks:
# about 40). Without it, where PYTHONDONTWRITEBYTECODE is set or the environment was installed
# without bytecode, each of them compiles those modules' source afresh: about 6 s a process on
# 2 cores, before it does anything. Semantics are unchanged; only .pyc files are written.
_pycache = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "pycache")
sys.pycache_prefix = os.environ["PYTHONPYCACHEPREFIX"] = _pycache
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

import jax  # noqa: E402  (after the bytecode settings above)

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
_cache = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "jax")
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

try:  # property tests draw the same examples on every run: CI never flakes on a new draw
    from hypothesis import settings

    settings.register_profile("titanax", derandomize=True, deadline=None, print_blob=True)
    settings.load_profile("titanax")
except ImportError:  # hypothesis is in the dev extra
    pass

# tests/unit/data/ holds test data and the script that generated some of it (it needs torch
# and transformers 4.x, which the project does not install): never collected as tests.
collect_ignore_glob = ["tests/unit/data/*"]
