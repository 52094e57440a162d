"""ELF: evaluation with distillation features (losses, feature bank, evaluation).

``feature_loss`` and ``elf_objective`` are imported eagerly (pure jnp); the evaluation entry
points and the feature bank load on first use so that importing the losses stays cheap.
"""

from elf_jax.losses import (  # noqa: F401
    FEATURE_KINDS,
    LOSS_MODES,
    elf_objective,
    feature_loss,
    task_loss,
)

_LAZY = {
    "evaluate_synset": "elf_jax.elf.evaluate",
    "cross_evaluate": "elf_jax.elf.evaluate",
    "validate_inputs": "elf_jax.elf.evaluate",
    "lambda_sweep": "elf_jax.elf.sweep",
    "FeatureBank": "elf_jax.elf.bank",
    "build_bank": "elf_jax.elf.bank",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'elf_jax.elf' has no attribute {name!r}")
