"""Evaluation training: the reference protocol, one train step, the chunked runner."""

from elf_jax.train.protocol import FULL_DSA_STRATEGY, EvalProtocol, torch_sgd  # noqa: F401
from elf_jax.train.step import EvalState, init_state, jit_train_step, train_step  # noqa: F401
from elf_jax.train.runner import (  # noqa: F401
    REPEAT_STRATEGIES,
    EvaluationDiverged,
    default_repeat_strategy,
    run_evaluation,
    test_accuracy,
)
