"""``tx.checkpoint``: Orbax checkpoints that restore onto any mesh, and never lose work.

Orbax does the storage (tensorstore, atomic commits, async saves); Titanax adds
what a parallel training run needs around it: the mesh a checkpoint was written
on, a description of every leaf so that a mismatched restore is a clear
`CheckpointError` rather than a deep traceback, JSON metadata
for the data position, and restores that lay every array out as ``like`` says,
whatever mesh it was saved from. Nothing is pickled: loading never runs code.

And what an operator needs to trust it: a checksum of every leaf's value, verified
on restore whatever the mesh (`titanax.checkpoint.checksum`); steps that only go
forward (a save that Orbax would skip is an error, `Manager.delete` rolls back);
steps still being written are not listed; missing or damaged files are an error
that names the step and the one to restore instead; Python scalars and strings
are saved and restored exactly.

Other frameworks' checkpoints come in through `titanax.checkpoint.safetensors`: a
safetensors file's tensors, transposed, stacked or re-ordered lazily, read straight into
sharded arrays, each device reading only its own shard.
"""

from titanax.checkpoint import safetensors  # tx.checkpoint.safetensors.Reader, .to_array
from titanax.checkpoint.leaves import abstract
from titanax.checkpoint.manager import Manager

__all__ = ["Manager", "abstract", "safetensors"]
