"""Training: the reference protocol, the one train step and the one engine (`runner.fit`)."""

from elf_jax.train.protocol import TrainProtocol, torch_sgd  # noqa: F401
from elf_jax.train.step import TrainState, init_state, jit_train_step, train_step  # noqa: F401
from elf_jax.train.runner import (  # noqa: F401
    REPEAT_STRATEGIES,
    TrainingDiverged,
    default_repeat_strategy,
    run_evaluation,
    test_accuracy,
)
