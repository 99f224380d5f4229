"""Shape families for training and evaluation, as data.

Each family has a ``train`` split and a ``held_out`` split that training never
samples, so zero-shot results are measured on shapes the policy has not seen.
Shapes are modest on purpose: every episode measures its final kernel (and the
naive kernel once per shape) on a 2-core machine.
"""

from __future__ import annotations

import math

FAMILIES: dict[str, dict[str, dict[str, list[str]]]] = {
    "matmul": {
        # square, and rectangular shapes of transformer layers (tokens x hidden x hidden)
        "default": {
            "train": ["128x128x128", "256x256x256", "384x384x384", "512x512x512",
                      "128x768x768", "256x1024x256", "512x256x1024", "64x512x512",
                      "200x300x100", "96x384x1536"],
            "held_out": ["320x320x320", "768x768x768", "1024x1024x1024", "256x3072x768",
                         "100x200x300", "127x255x65"],
        },
        # sizes that fill a large GPU; held out: the default family's GPU-sized ones
        "gpu": {
            "train": ["256x256x256", "512x512x512", "2048x2048x2048", "4096x4096x4096",
                      "512x2048x512", "1536x1536x1536", "128x4096x1024", "2048x512x2048",
                      "384x768x3072", "200x300x100"],
            "held_out": ["768x768x768", "1024x1024x1024", "256x3072x768", "3000x1000x2000"],
        },
    },
    "dense_bias_relu": {
        "default": {
            "train": ["128x128x128", "256x512x256", "64x1024x512", "512x512x512", "96x768x384"],
            "held_out": ["256x256x1024", "384x1536x384", "100x300x200"],
        },
    },
    "batch_matmul": {
        "default": {
            "train": ["4x128x128x64", "8x64x64x128", "12x128x64x128", "2x256x256x256", "16x32x128x64"],
            "held_out": ["8x128x128x64", "12x256x256x64", "3x100x50x70"],
        },
    },
    "conv2d": {
        # ResNet-18/50 3x3 and 1x1 layers at batch 1
        "default": {
            "train": ["1,64,56,56,64,3,3,1,1", "1,128,28,28,128,3,3,1,1", "1,256,14,14,256,3,3,1,1",
                      "1,64,56,56,256,1,1,1,0", "1,256,56,56,64,1,1,1,0", "1,128,28,28,512,1,1,1,0",
                      "1,3,224,224,64,7,7,2,3"],
            "held_out": ["1,512,7,7,512,3,3,1,1", "1,64,56,56,128,3,3,2,1", "1,256,14,14,1024,1,1,1,0",
                         "1,128,56,56,128,3,3,2,1"],
        },
    },
    "depthwise_conv2d": {
        # MobileNet depthwise layers
        "default": {
            "train": ["1,32,112,112,3,3,1,1", "1,96,112,112,3,3,2,1", "1,144,56,56,3,3,1,1",
                      "1,192,28,28,3,3,1,1", "1,384,14,14,3,3,1,1"],
            "held_out": ["1,144,56,56,3,3,2,1", "1,576,14,14,3,3,1,1", "1,960,7,7,3,3,1,1"],
        },
    },
}

FAMILIES["conv2d_bias_relu"] = FAMILIES["conv2d"]   # the same layers, with their bias and ReLU

# Small shapes of every family for tests and smoke runs (seconds, not minutes).
SMALL: dict[str, list[str]] = {
    "matmul": ["16x16x16", "24x40x8", "13x7x29", "1x17x5", "64x48x32"],
    "dense_bias_relu": ["16x16x16", "9x33x12", "32x8x5"],
    "batch_matmul": ["2x16x16x8", "3x7x13x5", "1x24x8x16"],
    "conv2d": ["1,4,8,8,8,3,3,1,1", "2,3,7,9,5,3,3,2,1", "1,8,6,6,4,1,1,1,0"],
    "depthwise_conv2d": ["1,8,10,10,3,3,1,1", "2,3,9,7,3,3,2,1", "1,4,5,5,3,3,1,0"],
    "conv2d_bias_relu": ["1,4,8,8,8,3,3,1,1", "2,3,7,9,5,3,3,2,1"],
}


# The cost model's data set (`costmodel --shape-set ranking`): shapes of every operator that
# no family holds out, square and skinny, powers of two and odd, small to mid-sized (a
# bad schedule of each still runs in about a second), so a model is judged on shapes it
# never saw by holding some of these out.
SHAPE_SETS: dict[str, dict[str, list[str]]] = {
    "ranking": {
        "matmul": ["64x64x64", "192x192x192", "256x128x64", "128x512x128", "33x65x129", "48x1024x96",
                   "384x64x256", "17x257x31", "320x192x160", "160x160x480", "512x384x256",
                   "96x96x96", "128x128x1024", "1024x64x64", "64x1024x64", "250x250x250", "7x512x512",
                   "512x32x512", "100x100x100", "480x240x120"],
        "dense_bias_relu": ["64x256x128", "128x64x512", "200x120x72", "31x300x47", "256x128x256",
                            "96x512x64", "16x1024x256", "144x144x144", "32x512x512", "128x256x64", "1x1024x1024",
                            "250x100x400", "64x64x64", "512x128x128", "77x177x277", "8x2048x512",
                            "192x96x288"],
        "batch_matmul": ["4x64x64x64", "2x96x128x32", "8x32x32x128", "6x50x70x30", "3x128x64x96",
                         "16x16x64x64", "2x200x40x80", "5x33x17x65", "12x64x64x64", "4x128x128x32", "2x256x64x128",
                         "8x49x49x64", "32x16x16x16", "1x256x256x128", "4x100x100x100", "6x80x60x120",
                         "3x31x63x127"],
        "conv2d": ["1,32,28,28,32,3,3,1,1", "1,16,56,56,32,3,3,1,1", "1,64,14,14,64,3,3,1,1",
                   "1,32,30,30,48,3,3,2,1", "1,128,7,7,128,3,3,1,1", "1,64,28,28,128,1,1,1,0",
                   "1,24,20,20,40,5,5,1,2", "2,8,32,32,16,3,3,1,1", "1,3,64,64,16,7,7,2,3",
                   "1,48,17,17,40,3,3,1,0", "1,16,32,32,16,3,3,1,1", "1,32,56,56,64,1,1,1,0",
                   "1,64,56,56,32,1,1,1,0", "1,8,64,64,24,3,3,2,1", "1,96,14,14,96,3,3,1,1",
                   "1,256,7,7,64,1,1,1,0", "1,40,24,24,40,5,5,1,2", "1,3,96,96,32,3,3,2,1",
                   "4,16,16,16,32,3,3,1,1"],
        "depthwise_conv2d": ["1,32,56,56,3,3,1,1", "1,64,28,28,3,3,2,1", "1,128,28,28,3,3,1,1",
                             "1,256,14,14,3,3,2,1", "1,48,40,40,5,5,1,2", "2,24,33,33,3,3,1,1",
                             "1,512,7,7,3,3,1,1", "1,96,19,19,3,3,1,0", "1,16,112,112,3,3,1,1",
                             "1,64,56,56,3,3,2,1", "1,160,14,14,3,3,1,1", "1,320,7,7,3,3,1,1",
                             "1,72,28,28,5,5,1,2", "1,24,60,60,3,3,1,1", "1,200,10,10,3,3,1,1",
                             "4,32,16,16,3,3,1,1", "1,120,28,28,3,3,2,1"],
    },
}


MATMUL_SIDES = (32, 64, 96, 128, 192, 256, 384, 512, 768, 100, 200, 300)   # a layer's rows, columns, depth
LARGE_SIDES = (512, 768, 1000, 1024, 1536, 2000, 2048, 3000, 3072, 4096, 6144, 8192)
MAX_PRODUCT = 2 ** 36   # multiply-adds of one drawn product


def _drawn(op: str, n: int, seed: int, exclude: set[str], batches: tuple[int, ...] = (1,),
           sides: tuple[int, ...] = MATMUL_SIDES) -> list[str]:
    """``n`` distinct shapes of ``op`` drawn like the layers of common networks (seeded), none
    in ``exclude``; a convolution's batch drawn from ``batches``, a product's sides from
    ``sides`` (at most MAX_PRODUCT multiply-adds): imitation's labels (the experts) cost
    nothing, so a policy can learn from many more shapes than PPO could measure."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def pick(*xs: int) -> int:
        return int(rng.choice(xs))

    out: list[str] = []
    while len(out) < n:
        if op in ("matmul", "dense_bias_relu"):
            dims = [pick(*sides) for _ in range(3)]
            if math.prod(dims) > MAX_PRODUCT:
                continue
            s = "x".join(map(str, dims))
        elif op == "batch_matmul":
            s = "x".join([str(pick(2, 4, 8, 12, 16))] +
                         [str(pick(32, 64, 96, 128, 256, 50, 100)) for _ in range(3)])
        elif op == "depthwise_conv2d":
            r, hw = pick(3, 3, 5), pick(7, 14, 28, 56, 112)
            c = pick(16, 32, 64, 96, 144, 192, 240, 384, 576, 960)
            s = f"1,{c},{hw},{hw},{r},{r},{pick(1, 1, 2)},{r // 2}"
        else:   # conv2d
            r, hw = pick(1, 3), pick(7, 14, 28, 56)
            c, k = pick(16, 32, 64, 96, 128, 192, 256, 384, 512), pick(16, 32, 64, 96, 128, 192, 256, 384, 512, 1024)
            s = f"{c},{hw},{hw},{k},{r},{r},{pick(1, 1, 2) if r == 3 else 1},{r // 2}"
            s = f"{pick(*batches) if len(batches) > 1 else batches[0]},{s}"
        if s not in exclude and s not in out:
            out.append(s)
    return out


def _grown(base: dict[str, list[str]], extra: list[str]) -> dict[str, list[str]]:
    """``base``'s family with ``extra`` added to its train split, its held-out split kept."""
    return {"train": base["train"] + extra, "held_out": base["held_out"]}


# Families grown from each operator's default one: "wide" adds the ranking set's shapes
# (none is held out anywhere), "many" 60 shapes drawn like network layers (`_drawn`), for
# imitation. On conv2d the greedy policy imitating "many" rebuilds the expert on 33 of 40
# fresh drawn shapes (seed 2), the one imitating the default split's 7 shapes on 13.
for _op, _ranking in SHAPE_SETS["ranking"].items():
    _default = FAMILIES[_op]["default"]
    _known = {*_default["train"], *_default["held_out"]}
    FAMILIES[_op]["wide"] = _grown(_default, _ranking)
    FAMILIES[_op]["many"] = _grown(_default, _drawn(_op, 60, 1, _known))


# 40 shapes of each operator drawn the same way (seed 2) outside the "many" family: a
# trained CPU policy's greedy kernels are compared with another's there (benchmark ppo-cpu).
CPU_DRAWN = {_op: _drawn(_op, 40, 2, {*FAMILIES[_op]["many"]["train"], *FAMILIES[_op]["many"]["held_out"]})
             for _op in SHAPE_SETS["ranking"]}


# The GPU's matmul family grown the same way ("gpu-many"): the bf16 CUDA policy imitating it
# rebuilds the expert on 21 of 40 fresh drawn shapes, the one imitating the "gpu" split on 9.
_gpu = FAMILIES["matmul"]["gpu"]
_gpu_known = {*_gpu["train"], *_gpu["held_out"], *FAMILIES["matmul"]["default"]["held_out"]}
FAMILIES["matmul"]["gpu-many"] = _grown(_gpu, _drawn("matmul", 60, 1, _gpu_known))
# 40 more drawn like them (seed 2) that no GPU family trains on: the GPU policies' greedy
# kernels are compared there (BENCHMARKS); conv2d's below.
GPU_DRAWN = {"matmul": _drawn("matmul", 40, 2, {*_gpu_known, *FAMILIES["matmul"]["gpu-many"]["train"]})}
# "gpu-more": 180 drawn (gpu-many's 60 first). Imitation costs no measurement, and with 190
# shapes the fp32 and tf32 policies rebuild the expert on all 40 of GPU_DRAWN and the 4 held
# out, where imitating gpu-many's 70 they did on 43 and 35 of those 44.
FAMILIES["matmul"]["gpu-more"] = _grown(_gpu, _drawn("matmul", 180, 1, _gpu_known | set(GPU_DRAWN["matmul"])))


# "gpu-large": gpu-more and 60 products of 512 to 8192 a side, where fp32 takes tensor cores
# and few network-like draws reach, which the fp32 CUDA policy imitates: with gpu-more's two
# tensor-core shapes alone (2048 and 4096) its greedy schedules tensorized on unseen large
# products but rebuilt none of their experts.
FAMILIES["matmul"]["gpu-large"] = _grown(FAMILIES["matmul"]["gpu-more"], _drawn(
    "matmul", 60, 3, _gpu_known | set(GPU_DRAWN["matmul"]) | set(FAMILIES["matmul"]["gpu-more"]["train"]),
    sides=LARGE_SIDES))


def shape_set(name: str) -> list[tuple[str, str]]:
    """(op, shape) of every shape in the named set."""
    if name not in SHAPE_SETS:
        raise ValueError(f"no shape set {name!r}; known: {', '.join(SHAPE_SETS)}")
    return [(op, shape) for op, shapes in SHAPE_SETS[name].items() for shape in shapes]


def family(op: str, split: str = "train", name: str = "default") -> list[str]:
    """Shapes of ``op``'s family ``name``: ``train``, ``held_out`` or ``small``."""
    if op not in FAMILIES:
        raise ValueError(f"no shape family for op {op!r}; known: {', '.join(FAMILIES)}")
    if split == "small":
        return list(SMALL[op])
    fams = FAMILIES[op]
    if name not in fams:
        raise ValueError(f"no family {name!r} for {op}; known: {', '.join(fams)}")
    if split not in fams[name]:
        raise ValueError(f"unknown split {split!r}; use train, held_out or small")
    return list(fams[name][split])

# The GPU's conv2d family: "many" and 30 layers drawn at batch 2, 4 and 8 (never ResNet-50's
# batch of 16, which the benchmarks hold out): more 3x3 layers with outputs enough for the
# tensor-core expert (kernels.experts.TENSOR_CORE_MIN_PIXELS).
_many = FAMILIES["conv2d"]["many"]
FAMILIES["conv2d"]["gpu-many"] = _grown(_many, _drawn("conv2d", 30, 3, {*_many["train"], *_many["held_out"]},
                                                       batches=(2, 4, 8)))
_conv_known = {*FAMILIES["conv2d"]["gpu-many"]["train"], *_many["held_out"]}
GPU_DRAWN["conv2d"] = _drawn("conv2d", 40, 2, _conv_known)
# "gpu-more": 100 layers more, at batch 1 to 8. Imitating it (197 shapes), the fp32, bf16 and
# tf32 conv2d policies rebuild the expert on all 40 of GPU_DRAWN and the 4 held out, where
# imitating gpu-many they did on 41, 38 and 40 of those 44; the fp32 and tf32 ones ship.
FAMILIES["conv2d"]["gpu-more"] = _grown(FAMILIES["conv2d"]["gpu-many"], _drawn(
    "conv2d", 100, 4, _conv_known | set(GPU_DRAWN["conv2d"]), batches=(1, 1, 2, 4, 8)))


def _spread(op: str, n: int, most_flops: float) -> list[str]:
    """``n`` of ``op``'s gpu-more train shapes of at most ``most_flops``, evenly spread over
    their sizes (small products rank differently from large ones: grid fill)."""
    from kernels.ir.ops import make_op

    flops = {s: make_op(op, s).flops for s in FAMILIES[op]["gpu-more"]["train"]}
    ranked = sorted((s for s, f in flops.items() if f <= most_flops), key=lambda s: (flops[s], s))
    return [ranked[round(i * (len(ranked) - 1) / (n - 1))] for i in range(n)]


# The GPU's ranking set (`costmodel --target cuda`): 16 matmul and 16 conv2d train shapes of
# the gpu-more families (so none held out or among GPU_DRAWN), of at most 20 GFLOP, so a
# slow random schedule still runs within the measurement's timeout.
SHAPE_SETS["ranking-gpu"] = {op: _spread(op, 16, 2e10) for op in ("matmul", "conv2d")}
