"""The reference's distill_DSA.sh: DSA on CIFAR-100, IPC 10, with the MSE gradient distance.

Reference command (Lirui-Zhao/ELF):
    python -u distill_DSA.py --dataset CIFAR100 --model ConvNet --ipc 10 --init real \
        --method DSA --dsa_strategy color_crop_cutout_flip_scale_rotate --num_eval 5 \
        --num_exp 1 --dis_metric mse --CUDA_VISIBLE_DEVICES 0,1,2,3 --data_path data
Here (CIFAR-100 prepared by TFDS):
    elf-jax distill --config configs/reference_distill_dsa.py --workdir runs/ref_dsa_c100

Settings of the script: `dis_metric mse`, init from real images, DSA, 5 evaluation nets.
Assumed from the DC/DSA code it is built on (not in the script): 1000 iterations, lr_img
0.1 (momentum 0.5), lr_net 0.01, batch_real 256, (outer_loop, inner_loop) = (10, 50) for
IPC 10, the best set by evaluation every 500 iterations (1000 epochs). Data normalized as
utils_DC.py (`stats="dc"`: the true CIFAR-100 mean/std); see configs/reference_distill_dm.py
for reading the set in the ELF evaluation.
"""

from elf_jax.config import base_config, reference_preset


def get_config():
    c = reference_preset(base_config())
    c.dataset = "cifar100"
    c.stats = "dc"  # utils_DC.py: the true CIFAR-100 statistics
    s = c.synset
    s.source, s.method, s.arch, s.ipc, s.init = "distill", "dsa", "ConvNet", 10, "real"
    s.iterations = 1000
    s.lr_img = 0.1
    s.lr_net = 0.01
    s.batch_real = 256
    s.dis_metric = "mse"
    s.eval_every = 500
    s.eval_epochs = 1000
    s.eval_repeats = 5
    s.checkpoint_every = 50
    return c
