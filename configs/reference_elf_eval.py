"""The reference's ELF_eval.sh: ELF evaluation of an MTT CIFAR-100 IPC-10 set on ResNet18.

Reference command (Lirui-Zhao/ELF):
    python -u ELF_eval.py --CUDA_VISIBLE_DEVICES=0,1,2,3 --dataset=CIFAR100 --ipc=10 \
        --loss_mode=front_rear_task --distill_model=ConvNet --feature_model=ConvNetW512_L3 \
        --eval_model=ResNet18_Layered --eval_mode=itself --feature_epochs=100 --buffer_mom \
        --lamda_front=1 --lamda_rear=1 --feature_loss_mode=CE --data_path=data \
        --distilled_data_dir=result_MTT --buffer_path=buffer
Here (CIFAR-100 prepared by TFDS), reading the reference's set and teacher buffer from the
paths the scripts write them to:
    elf-jax evaluate --config configs/reference_elf_eval.py --workdir runs/ref_elf_c100
Other sets or teachers: `--config.synset.path=...` (images_best.pt folder),
`--config.teacher.reference_buffer=...` ('' = train the teacher of
configs/reference_elf_buffer.py here first: `elf-jax all`); the baseline of the paper's
tables is the same command with `--loss_mode=task`: add "task" to `eval.modes`.

Settings of the script: the set imported from result_MTT (images_best.pt, labels_best.pt;
read in utils.py's space: CIFAR-10's mean/std), one feature bank from snapshot 100 of the
last trajectory of buffer/CIFAR100_NO_ZCA/ConvNetW512/momentum/replay_buffer_0.pt (the
buffer of ELF_buffer.sh), eval_mode "itself" (the pool is ResNet18 only), loss
front_rear_task with the channel CE and both lambdas 1; ELF_eval.py's defaults: 5
evaluation nets (`num_eval`), 1000 epochs (`epoch_eval_train`, the loop runs 0..1000),
lr 0.01 (`lr_net`: not the learned lr), batch 256, DSA on. `config.reference_preset`:
BatchNorm as 4-GPU DataParallel (no BN in ResNet18) and the reference's loss-mode quirks
(no effect on front_rear_task). Not reproduced: the reference's seed (3407) and its random
streams.
"""

from elf_jax.config import base_config, reference_preset

RESULT_MTT = "result_MTT/CIFAR100_NO_ZCA/ConvNet/10ipc"
FEATURE_BUFFER = "buffer/CIFAR100_NO_ZCA/ConvNetW512/momentum/replay_buffer_0.pt"


def get_config():
    c = base_config()
    c.dataset = "cifar100"
    c.synset.source, c.synset.path, c.synset.method = "import", RESULT_MTT, "mtt"
    c.synset.arch, c.synset.ipc = "ConvNet", 10
    c.teacher.arch = c.teacher.override_arch = "ConvNetW512"
    c.teacher.reference_buffer = FEATURE_BUFFER
    c.teacher.reference_trajectory = -1
    c.teacher.feature_epoch = 100
    c.eval.pool = ("ResNet18",)
    c.eval.modes = ("front_rear_task",)
    c.eval.kind = "ce"
    c.eval.lambda_front = c.eval.lambda_rear = 1.0
    c.eval.repeats = 5
    c.eval.epochs = 1000
    c.eval.lr = 0.01
    c.eval.use_learned_lr = False
    c.eval.batch_size = 256
    return reference_preset(c)
