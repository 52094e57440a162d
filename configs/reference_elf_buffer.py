"""The reference's ELF_buffer.sh: the ConvNetW512 teacher ("feature model") on CIFAR-100.

Reference command (Lirui-Zhao/ELF):
    python -u buffer.py --CUDA_VISIBLE_DEVICES=0,1,2,3 --dataset=CIFAR100 --model=ConvNetW512 \
        --train_epochs=200 --num_experts=1 --save_interval=1 --buffer_path=buffer \
        --data_path=data --num_workers=12 --mom=0.9 --l2=0.0005 --decay
Here (CIFAR-100 prepared by TFDS):
    elf-jax train-teacher --config configs/reference_elf_buffer.py --workdir runs/ref_c100

Settings of the script: ConvNetW512 (instance norm), 200 epochs, SGD lr 0.01 (buffer.py's
default lr_teacher), momentum 0.9, weight decay 5e-4, batch 256, DSA on, lr x0.1 once after
epoch 101 (`train_epochs // 2 + 1`), one trajectory with a snapshot every epoch; ELF reads
snapshot 100. `config.reference_preset`: data normalized as the reference's utils.py
(CIFAR-10's mean/std for CIFAR-100) and BatchNorm as 4-GPU DataParallel (no BN in this
net). The ELF_eval.sh setting (configs/reference_elf_eval.py) can use this workdir's teacher,
or the reference's own buffer through `teacher.reference_buffer`.

Expected: ~55-60% test accuracy after epoch 100 (the reference's teacher).
"""

from elf_jax.config import base_config, reference_preset


def get_config():
    c = base_config()
    c.dataset = "cifar100"
    c.teacher.arch = "ConvNetW512"
    c.teacher.epochs = 200
    c.teacher.lr = 0.01
    c.teacher.momentum = 0.9
    c.teacher.weight_decay = 5e-4
    c.teacher.batch_size = 256
    c.teacher.lr_decay = True
    c.teacher.feature_epoch = 100
    c.teacher.override_arch = "ConvNetW512"  # one feature model, as the reference
    return reference_preset(c)
