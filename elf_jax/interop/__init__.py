"""Interop with the PyTorch reference repositories (weights, expert buffers, synthetic sets).

Everything lives in :mod:`elf_jax.interop.torch`; torch itself is imported only when a
function needs it (``pip install 'elf_jax[torch]'``).
"""

from elf_jax.interop import torch as _torch
from elf_jax.interop.torch import (  # noqa: F401
    export_reference_synset,
    export_replay_buffer,
    flat_param_shapes,
    flat_params_to_variables,
    from_torch_state_dict,
    load_reference_synset,
    load_reference_teacher,
    load_replay_buffer,
    replay_buffer_files,
    reference_state_dict_keys,
    to_torch_state_dict,
    variables_to_flat_params,
)

__all__ = [n for n in _torch.__all__ if n != "require_torch"]
