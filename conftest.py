"""Test set-up shared by tests/, doctests in titanax/ and the docs: 8 simulated CPU
devices and a persistent compilation cache inside the clone."""

import os

os.environ.setdefault("NPROC", "32")  # see titanax/__init__.py: CPU collectives need threads

import jax

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
