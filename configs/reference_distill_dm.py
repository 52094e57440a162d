"""The reference's distill_DM.sh: DM on CIFAR-100, IPC 10.

Reference command (Lirui-Zhao/ELF):
    python -u distill_DM.py --dataset CIFAR100 --model ConvNet --ipc 10 \
        --dsa_strategy color_crop_cutout_flip_scale_rotate --init real --lr_img 1 \
        --num_exp 1 --num_eval 5 --CUDA_VISIBLE_DEVICES 0,1,2,3 --data_path data
Here (CIFAR-100 prepared by TFDS):
    elf-jax distill --config configs/reference_distill_dm.py --workdir runs/ref_dm_c100

Settings of the script and distill_DM.py's defaults: 20,000 iterations, lr_img 1
(momentum 0.5), batch_real 256, init from real images, DSA (siamese per class), a fresh
ConvNet each iteration; the best set by evaluating every 2,000 iterations 5 ConvNets for
1000 epochs (lr 0.01). The data are normalized as utils_DC.py does (the TRUE CIFAR-100
mean/std, `stats="dc"`), unlike the reference's ELF evaluation (utils.py, `stats="mtt"`),
which reads the saved images_best.pt as they are: import that file into an ELF run with
`synset.import_stats=mtt` to reproduce that reading, or `dc` to convert it.
"""

from elf_jax.config import base_config, reference_preset


def get_config():
    c = reference_preset(base_config())
    c.dataset = "cifar100"
    c.stats = "dc"  # utils_DC.py: the true CIFAR-100 statistics
    s = c.synset
    s.source, s.method, s.arch, s.ipc, s.init = "distill", "dm", "ConvNet", 10, "real"
    s.iterations = 20000
    s.lr_img = 1.0
    s.batch_real = 256
    s.eval_every = 2000
    s.eval_epochs = 1000
    s.eval_repeats = 5
    s.checkpoint_every = 500
    return c
