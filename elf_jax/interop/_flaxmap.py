"""Canonical reference layer ids (see ``_refspec``) -> paths in our Flax variable trees.

One function per family; each returns the path (tuple of keys) of the layer's module in
the ``params`` collection (BatchNorm running statistics live at the same path in
``batch_stats``). Leaf names are fixed by ``elf_jax.models.layers``: conv/dense
``kernel``/``bias``, norms ``scale``/``bias``, BatchNorm statistics ``mean``/``var``.

If the model zoo renames a module, this table is the one place to change; the converter
checks every mapped path against the model's real variable tree and names any mismatch.
"""

from __future__ import annotations

__all__ = ["flax_path"]


def _convnet(cid):
    # ("block", d, "conv"|"norm") -> block{d+1}/conv|norm; ("classifier",)
    if cid[0] == "block":
        return (f"block{cid[1] + 1}", cid[2])
    return ("classifier",)


def _alexnet(cid):
    if cid[0] == "block":
        return (f"block{cid[1] + 1}", cid[2])
    return ("classifier",)


def _vgg(cid):
    # ("conv", i, "conv"|"norm"): the i-th conv layer of the VGG cfg (0-based)
    if cid[0] == "conv":
        return (f"block{cid[1] + 1}", cid[2])
    return ("classifier",)


def _vgg_imagenet(cid):
    # 64x64 VGG: the classifier is an MLP classifier/fc1..fc3 (torch classifier.0/3/6)
    if cid[0] == "conv":
        return (f"block{cid[1] + 1}", cid[2])
    if cid[0] == "mlp":
        return ("classifier", f"fc{cid[1] + 1}")
    return ("classifier", "fc3")


def _resnet(cid):
    if cid[0] == "stem":
        return ("stem", cid[1])
    if cid[0] == "stage":
        _, s, b, leaf = cid
        return (f"stage{s + 1}", f"block{b + 1}", leaf)
    return ("classifier",)


def _mlp(cid):
    if cid[0] == "fc":
        return (f"fc{cid[1] + 1}",)
    return ("fc3",)


def _lenet(cid):
    if cid[0] == "block":
        return (f"block{cid[1] + 1}", "conv")
    if cid[0] == "fc":
        return (f"fc{cid[1] + 1}",)
    return ("fc3",)


_FAMILIES = {
    "convnet": _convnet,
    "alexnet": _alexnet,
    "vgg": _vgg,
    "vgg_imagenet": _vgg_imagenet,
    "resnet": _resnet,
    "mlp": _mlp,
    "lenet": _lenet,
}


def flax_path(family, cid):
    return _FAMILIES[family](cid)
