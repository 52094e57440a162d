"""ELF evaluation on ImageNet-1k at 64x64, data parallel with jax.shard_map.

The settings of configs/imagenet64.py (ConvNetD4W512 teacher, the reference's six-net
`cross_imagenet` pool, float32; `--config.dtype=bfloat16` for bf16) plus a `parallel`
section, read by the evaluation stage of the one pipeline (elf_jax/pipeline.py): every
evaluation train step runs data parallel over all devices (`shard_map` over a ("runs",
"data") mesh, synchronized BatchNorm, the DSA draw made for the global minibatch as on one
device), the synthetic set and the feature bank split by rows over the devices, the bank
stored in bfloat16. IPC 10 = 10,000 images; the memory estimate is printed before the
evaluation and the run stops with a clear error if it will not fit. The teachers train data
parallel on all devices too; the synthetic set and the banks are made on one device.

Run (one host, all devices):
    elf-jax all --config configs/imagenet64_shard_map.py --workdir runs/imagenet64_shard_map

Several hosts: start one process per host with the same coordinator, e.g.
    ELF_JAX_COORDINATOR=host0:1234 ELF_JAX_NUM_PROCESSES=2 ELF_JAX_PROCESS_ID=<i> \
        elf-jax all --config configs/imagenet64_shard_map.py --workdir runs/imagenet64_shard_map
(or `--config.distributed.*`: the CLI starts `jax.distributed` from that section).

Data: streamed from the array_record files as in configs/imagenet64.py (its docstring gives
the memory per host); on several hosts each process reads only the rows of its own devices
of every teacher minibatch (tests/test_multihost.py), so a host's share of the reading is
1 / number of hosts. Tested end to end, shrunk, on a local stand-in dataset
(tests/test_parallel_e2e.py: 8 simulated devices, streamed; tests/test_memory_cap.py,
marked slow: two devices).
"""

from elf_jax.config import imagenet64_config


def get_config():
    c = imagenet64_config()
    c.parallel.parallel = "shard_map"  # the base config's section, default "none"
    c.parallel.bank_dtype = "bfloat16"  # the bank stored in bfloat16 on the devices
    # c.distributed.*: the coordinator etc. when not taken from the environment
    return c
