"""The reference's buffer_MTT.sh + distill_MTT.sh: MTT on CIFAR-100, IPC 10.

Reference commands (Lirui-Zhao/ELF):
    python -u buffer.py --CUDA_VISIBLE_DEVICES=0,1,2,3 --dataset=CIFAR100 --model=ConvNet \
        --train_epochs=50 --num_experts=100 --save_interval=10 --buffer_path=buffer \
        --data_path=data --num_workers=12
    python -u distill_MTT.py --CUDA_VISIBLE_DEVICES=0,1,2,3 --model=ConvNet --dataset=CIFAR100 \
        --ipc=10 --syn_steps=20 --expert_epochs=2 --max_start_epoch=40 --lr_img=1e3 \
        --lr_lr=1e-5 --lr_teacher=1e-2 --Iteration=5000 --load_all --buffer_path=buffer \
        --data_path=data
Here (CIFAR-100 prepared by TFDS), training the 100 experts first:
    elf-jax distill --config configs/reference_distill_mtt.py --workdir runs/ref_mtt_c100
or with the reference's expert buffers (all replay_buffer_<n>.pt files, in order):
    elf-jax distill --config configs/reference_distill_mtt.py --workdir runs/ref_mtt_c100 \
        --config.synset.experts=buffer/CIFAR100_NO_ZCA/ConvNet

Settings of the scripts: experts = 100 ConvNets trained 50 epochs (SGD lr 0.01, no
momentum, no weight decay, no decay, DSA); distillation 5000 iterations, syn_steps 20,
expert_epochs 2, max_start_epoch 40, lr_img 1e3, lr_lr 1e-5, lr_teacher 1e-2, batch_syn =
all images, init from real images, ZCA off; every trajectory of every buffer file, drawn
uniformly (`--load_all`); the best set by evaluating every 100 iterations (distill_MTT.py's
`eval_it` default) 5 ConvNets (`num_eval`) for 1000 epochs (`epoch_eval_train`) trained
WITH the learned lr. `config.reference_preset` adds utils.py's normalization (CIFAR-10's
mean/std) and the short student batch used first (no effect with batch_syn = all).
Assumed (not in the scripts): expert snapshots kept for epochs 0..50.

Expected: about 40% ConvNet test accuracy for MTT CIFAR-100 IPC 10 (MTT paper, with ZCA).
"""

from elf_jax.config import base_config, reference_preset


def get_config():
    c = base_config()
    c.dataset = "cifar100"
    s = c.synset
    s.source, s.method, s.arch, s.ipc, s.init = "distill", "mtt", "ConvNet", 10, "real"
    s.iterations = 5000
    s.syn_steps = 20
    s.expert_epochs = 2
    s.max_start_epoch = 40
    s.lr_img = 1e3
    s.lr_lr = 1e-5
    s.lr_teacher = 1e-2
    s.experts = ""  # "" = train them (buffer_MTT.sh); or the reference's buffer directory
    s.num_experts = 100
    s.expert_train_epochs = 50
    s.eval_every = 100
    s.eval_epochs = 1000
    s.eval_repeats = 5
    s.checkpoint_every = 100
    return reference_preset(c)
