"""NA-Search: Differentiable Search of Normalization and Activation (Seo, 2025), in one file.

Read it next to the paper; the sections follow the paper's order:

  1. search space, eq 3 ........ O = {BN, IN, LN, GN} x {ReLU, Swish, GELU, Mish}: `OPS`, `NormAct`
                                  (hand-written norms and activations, checked against torch's own)
  2. DARTS relaxation, eq 1 .... y = sum_i softmax(alpha)_i o_i(x): `darts_weights`
  3. k-sampling, eq 4 .......... S(k) = top-k of alpha_i + g_i, g_i ~ Gumbel(0, 1): `gumbel_topk`
  4. subset mixture, eq 5 ...... y = sum_{i in S(k)} w_i o_i(x), w = softmax(alpha_S / tau): `subset_softmax`,
                                  `MixedNA` (computes only the k chosen candidates)
  5. cell and network .......... `SearchNet` (9 cells of conv3x3 + MixedNA), `genotype`, `Network` (derived),
                                  `ResNet18` (every norm+activation site searchable)
  6. bilevel search, eq 2 ...... `bilevel_step` (first order, alternating), `k_at`, `tau_at` (schedules)
  7. data ...................... `load_cifar` (raw python batches, safe unpickling), `Batches`
  8. runs ...................... devices, random states, atomic files, run folders, measurement helpers
                                  (used by search.py, retrain.py and bench.py; not part of the method)

Only numpy and torch are needed; copy this file into a project and `import nasearch`.
"""
import hashlib
import io
import math
import os
import pickle
import random
import tarfile
import time
import urllib.request

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------------
# 1. Search space (eq 3): O = {(n, a) | n in N, a in A}, M = |N| x |A| = 16 candidates per cell

NORMS = ("BN", "IN", "LN", "GN")
ACTIVATIONS = ("ReLU", "Swish", "GELU", "Mish")
OPS = tuple(f"{n}+{a}" for n in NORMS for a in ACTIVATIONS)  # norms outer, activations inner
GN_GROUPS = 8  # 8 divides every width used (16..512) and keeps GN distinct from IN (C groups) and LN (1)
EPS = 1e-5     # the eps of nn.BatchNorm2d / GroupNorm / LayerNorm / InstanceNorm2d


def mean_var(x, dims):
    """Biased mean and variance over `dims` with plain ops: coremltools 9 cannot convert torch.var_mean."""
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square_().mean(dims, keepdim=True)  # two-pass: no cancellation as in E[x^2] - mean^2
    return mean, var


def scale_shift(x, mean, rstd, gamma, beta):
    """(x - mean) * rstd * gamma + beta, folded into one scale and one shift per (sample,) channel."""
    scale = gamma * rstd
    return (x * scale).add_(beta - mean * scale)


class Normalize(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta, statistics over `dims` of x.

    Autograd through the plain formula would keep x - mean and x_hat for backward; this keeps only x
    (as F.batch_norm does) and applies the textbook gradient, with x_hat = (x - mean) * rstd, g = dL/dy:
        dbeta = sum g,  dgamma = sum g x_hat,  dx = rstd (g' - mean(g') - x_hat mean(g' x_hat)),  g' = g gamma
    rearranged so the full-size tensors are read by two sums (of g and g x) and written once:
        dx = g * (gamma rstd) + x * a + b,  a = -rstd mean(g' x_hat) rstd,  b = -a mean - rstd mean(g').
    Returns y and the batch statistics (mean, var), the latter for BN's running averages.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, dims):
        mean, var = mean_var(x, dims)
        rstd = (var + EPS).rsqrt()
        ctx.save_for_backward(x, mean, rstd, gamma)
        ctx.dims = dims
        ctx.mark_non_differentiable(mean, var)
        return scale_shift(x, mean, rstd, gamma, beta), mean, var

    @staticmethod
    def backward(ctx, g, _mean_grad, _var_grad):
        x, mean, rstd, gamma = ctx.saved_tensors
        n = x.numel() // mean.numel()  # elements per statistic
        # sum first over the dims that both the statistics and gamma broadcast over (N, H, W for BN;
        # H, W for the others): what is left is small, one value per (sample,) channel
        shared = tuple(d for d in range(x.dim()) if mean.shape[d] == 1 and gamma.shape[d] == 1)
        gx = g * x
        sum_g, sum_gx = g.sum(shared, keepdim=True), gx.sum(shared, keepdim=True)
        dbeta = sum_g.sum_to_size(gamma.shape)
        dgamma = (rstd * (sum_gx - mean * sum_g)).sum_to_size(gamma.shape)  # sum g x_hat
        mean_gh = (gamma * sum_g).sum(ctx.dims, keepdim=True) / n  # mean(g')
        mean_gh_xhat = rstd * ((gamma * sum_gx).sum(ctx.dims, keepdim=True) / n - mean * mean_gh)  # mean(g' x_hat)
        a = -rstd * rstd * mean_gh_xhat
        b = -a * mean - rstd * mean_gh
        dx = torch.mul(x, a, out=gx).add_(b).addcmul_(g, gamma * rstd)  # reuses gx: fresh pages are slow
        return dx, dgamma, dbeta, None


def normalize(x, gamma, beta, dims):
    """Normalize x over `dims` with batch statistics; returns (y, mean, var)."""
    if torch.is_grad_enabled() and (x.requires_grad or gamma.requires_grad):
        return Normalize.apply(x, gamma, beta, dims)
    mean, var = mean_var(x, dims)  # the same forward, traceable for export (no autograd.Function)
    return scale_shift(x, mean, (var + EPS).rsqrt(), gamma, beta), mean, var


def batch_norm(x, gamma, beta, running_mean, running_var, training, momentum=0.1):
    """BN: per channel over (N, H, W). Training uses batch statistics and updates the running ones
    (unbiased variance, as nn.BatchNorm2d does); eval uses the running statistics."""
    channel = (1, -1, 1, 1)  # -1, not C: traced shape arithmetic would not convert to Core ML
    gamma, beta = gamma.view(channel), beta.view(channel)
    if not training:
        return scale_shift(x, running_mean.view(channel), (running_var.view(channel) + EPS).rsqrt(), gamma, beta)
    y, mean, var = normalize(x, gamma, beta, (0, 2, 3))
    if running_mean is not None:
        n = x.numel() // x.shape[1]
        with torch.no_grad():
            running_mean.lerp_(mean.flatten(), momentum)
            running_var.lerp_(var.flatten() * (n / max(n - 1, 1)), momentum)
    return y


def group_norm(x, groups, gamma, beta):
    """GN: per sample over each group of C/groups channels and (H, W); per-channel affine.
    IN is group_norm with groups = C, LN (per sample over C, H, W) is group_norm with groups = 1."""
    affine = (1, groups, -1, 1, 1)
    y, _, _ = normalize(x.view(x.shape[0], groups, -1, *x.shape[2:]), gamma.view(affine), beta.view(affine), (2, 3, 4))
    return y.view(x.shape)


class Pointwise(torch.autograd.Function):
    """y = f(x) keeping only x for backward, dx = g * f'(x), with f' written out below.
    (Autograd through x * sigmoid(x) or the erf form of GELU would keep 2-3 tensors per activation.)"""

    @staticmethod
    def forward(ctx, x, f, df):
        ctx.save_for_backward(x)
        ctx.df = df
        return f(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return ctx.df(x).mul_(g), None, None


# Activations and their derivatives. In-place ops (name_) work on fresh temporaries only: each full-size
# allocation costs page faults on CPU, so fewer of them keeps these close to torch's fused kernels.

def relu(x):  # max(x, 0)
    return x.clamp_min(0.0)


def relu_grad(x):  # 1 if x > 0 else 0
    return (x > 0).to(x.dtype)


def swish(x):  # x sigmoid(x)
    return torch.sigmoid(x).mul_(x)


def swish_grad(x):  # s + x s (1 - s) = s (1 + x (1 - s)),  s = sigmoid(x)
    s = torch.sigmoid(x)
    return (1 - s).mul_(x).add_(1).mul_(s)


def normal_cdf(x):  # Phi(x) = (1 + erf(x / sqrt 2)) / 2
    return (x * (1 / math.sqrt(2))).erf_().add_(1).mul_(0.5)


def gelu(x):  # x Phi(x), the exact (erf) GELU
    return normal_cdf(x).mul_(x)


def gelu_grad(x):  # Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
    return x.square().mul_(-0.5).exp_().mul_(x).mul_(1 / math.sqrt(2 * math.pi)).add_(normal_cdf(x))


def mish(x):  # x tanh(softplus(x)),  softplus(x) = log(1 + e^x)
    return F.softplus(x).tanh_().mul_(x)


def mish_grad(x):  # t + x (1 - t^2) sigmoid(x),  t = tanh(softplus(x))
    t = F.softplus(x).tanh_()
    return t.square().neg_().add_(1).mul_(x).mul_(torch.sigmoid(x)).add_(t)


ACTIVATION_FNS = {"ReLU": (relu, relu_grad), "Swish": (swish, swish_grad),
                  "GELU": (gelu, gelu_grad), "Mish": (mish, mish_grad)}


def activation(name, x):
    """One of ACTIVATIONS applied to x, through Pointwise when a gradient is needed."""
    f, df = ACTIVATION_FNS[name]
    if torch.is_grad_enabled() and x.requires_grad:
        return Pointwise.apply(x, f, df)
    return f(x)


class NormAct(nn.Module):
    """One candidate o_i = (n_i, a_i) of eq 3 on `channels` channels, e.g. NormAct("GN+GELU", 64).

    Every candidate owns a per-channel affine gamma, beta (2C parameters, the same for all 16); BN also
    keeps running statistics. With `residual`, computes a(n(x) + residual) (a ResNet block's second site).
    """

    def __init__(self, op, channels):
        super().__init__()
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; valid ops: {', '.join(OPS)}")
        self.op, self.norm, self.act = op, *op.split("+")
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        if self.norm == "BN":
            self.register_buffer("running_mean", torch.zeros(channels))
            self.register_buffer("running_var", torch.ones(channels))
        elif self.norm == "GN" and channels % GN_GROUPS:
            raise ValueError(f"GN needs channels divisible by {GN_GROUPS}, got {channels}")

    def forward(self, x, residual=None, update_stats=True):
        if self.norm == "BN":
            y = batch_norm(x, self.gamma, self.beta, self.running_mean, self.running_var, self.training,
                           momentum=0.1 if update_stats else 0.0)  # 0: running statistics unchanged
        else:
            groups = {"IN": x.shape[1], "LN": 1, "GN": GN_GROUPS}[self.norm]
            y = group_norm(x, groups, self.gamma, self.beta)
        if residual is not None:
            y = y + residual
        return activation(self.act, y)

    def extra_repr(self):
        return self.op


# ----------------------------------------------------------------------------------------------------
# 2-4. The mixed operation: eq 1 (DARTS, all M candidates), eq 4 (Gumbel top-k), eq 5 (k candidates)

def darts_weights(alpha):
    """eq 1: the weights e^alpha_i / sum_j e^alpha_j of all M candidates."""
    return torch.softmax(alpha, dim=0)


def gumbel_topk(alpha, k, generator=None):
    """eq 4: S(k) = argmax_{|S|=k} sum_{i in S} (alpha_i + g_i), g_i ~ Gumbel(0, 1), i.e. the top k of
    alpha + g: k distinct indices, distributed as sampling k times without replacement from softmax(alpha).
    Drawn on the generator's device (CPU by default), so runs replay identically on any accelerator."""
    device = generator.device if generator is not None else alpha.device
    u = torch.rand(alpha.shape, generator=generator, device=device)
    g = -torch.log(-torch.log(u))  # Gumbel(0, 1); u = 0 gives -inf, never chosen
    return torch.topk(alpha.detach().to(device) + g, k).indices


def subset_softmax(alpha, idx, tau):
    """eq 5: w_i = e^(alpha_i / tau) / sum_{j in S(k)} e^(alpha_j / tau) for i in idx = S(k) only."""
    return torch.softmax(alpha[idx.to(alpha.device)] / tau, dim=0)


class MixedNA(nn.Module):
    """A searchable norm + activation: a drop-in for a norm/activation pair in any model.

    Owns the architecture logits `alpha` (one per candidate of OPS) and the 16 candidates.
      training, mode "sample": S(k) by eq 4, output by eq 5; only the k chosen candidates run.
      training, mode "darts":  eq 1, all 16 candidates weighted by softmax(alpha).
      eval (deterministic):    "sample" uses the k largest alpha (eq 5 without noise; k = 1 is the
                               derived op), "darts" is eq 1 as in training.
    `k` and `tau` are plain attributes, set by the schedules. `recompute=True` keeps only the input for
    backward and recomputes the k candidates there (memory independent of k, for more time).
    """

    def __init__(self, channels, k=2, tau=1.0, mode="sample", recompute=False, generator=None):
        super().__init__()
        self.alpha = nn.Parameter(1e-3 * torch.randn(len(OPS)))  # DARTS' initialisation
        self.ops = nn.ModuleList(NormAct(op, channels) for op in OPS)
        self.k, self.tau, self.mode, self.recompute, self.generator = k, tau, mode, recompute, generator

    def choose(self):
        """The candidates to run and their weights: (indices, weights)."""
        if self.mode == "darts":
            return torch.arange(len(OPS)), darts_weights(self.alpha)  # eq 1
        if self.mode != "sample":
            raise ValueError(f"MixedNA.mode must be 'sample' or 'darts', got {self.mode!r}")
        if self.training:
            idx = gumbel_topk(self.alpha, self.k, self.generator)  # eq 4
        else:
            idx = torch.topk(self.alpha.detach(), self.k).indices
        return idx, subset_softmax(self.alpha, idx, self.tau)  # eq 5

    def mix(self, x, idx, w, residual=None, update_stats=True):
        """y = sum_{i in idx} w_i o_i(x): the only place candidates are computed."""
        y = None
        for j, i in enumerate(idx.tolist()):
            term = w[j] * self.ops[i](x, residual, update_stats)
            y = term if y is None else y + term
        return y

    def forward(self, x, residual=None):
        idx, w = self.choose()
        if not (self.recompute and torch.is_grad_enabled()):
            return self.mix(x, idx, w, residual)
        first = iter([True])  # BN running statistics count the batch once, not again in the recomputation
        return checkpoint(lambda x, w, r: self.mix(x, idx, w, r, next(first, False)),
                          x, w, residual, use_reentrant=False)

    def extra_repr(self):
        return f"k={self.k}, tau={self.tau:g}, mode={self.mode}, recompute={self.recompute}"


def mixed_ops(model):
    """The MixedNA modules of a model in the order they were defined (the forward order, for the nets here)."""
    return [m for m in model.modules() if isinstance(m, MixedNA)]


def genotype(model):
    """Table 1: the op name of argmax alpha for each MixedNA, in order."""
    return [OPS[int(m.alpha.argmax())] for m in mixed_ops(model)]


# ----------------------------------------------------------------------------------------------------
# 5. Cells and networks

def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BatchNorm(nn.Module):
    """The hand-written BN alone (no activation, not searched): the stem's and ResNet shortcuts' norm."""

    def __init__(self, channels):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return batch_norm(x, self.gamma, self.beta, self.running_mean, self.running_var, self.training)


class CellNet(nn.Module):
    """stem conv3x3 + BN, then len(widths) stages x cells_per_stage cells of conv3x3 + norm-act site,
    stride 2 at the first cell of every stage but the first, global average pool, linear.
    `site(channels, index)` builds the norm+activation of each cell: a MixedNA or a fixed NormAct."""

    def __init__(self, site, num_classes, widths, cells_per_stage):
        super().__init__()
        self.widths, self.num_classes = tuple(widths), num_classes
        self.stem = nn.Sequential(conv3x3(3, widths[0]), BatchNorm(widths[0]))
        convs, sites, cin = [], [], widths[0]
        for s, width in enumerate(widths):
            for c in range(cells_per_stage):
                convs.append(conv3x3(cin, width, 2 if s > 0 and c == 0 else 1))
                sites.append(site(width, len(sites)))
                cin = width
        self.convs, self.sites = nn.ModuleList(convs), nn.ModuleList(sites)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for conv, site in zip(self.convs, self.sites):
            x = site(conv(x))
        return self.classifier(x.mean((2, 3)))


class SearchNet(CellNet):
    """The supernet searched in the paper: 3 stages x 3 cells, every cell's norm+activation a MixedNA.
    All cells share one CPU generator for their Gumbel noise (`self.generator`, saved in checkpoints)."""

    def __init__(self, num_classes=10, widths=(16, 32, 64), cells_per_stage=3, seed=0):
        self.generator = torch.Generator().manual_seed(seed)
        super().__init__(lambda c, i: MixedNA(c, generator=self.generator), num_classes, widths, cells_per_stage)


def check_genotype(geno, length):
    """Raise a one-line ValueError unless geno is `length` valid op names."""
    bad = list(dict.fromkeys(op for op in geno if op not in OPS))
    if bad or len(geno) != length:
        what = f"unknown op(s) {', '.join(map(repr, bad))}" if bad else f"{len(geno)} ops, expected {length}"
        raise ValueError(f"bad genotype: {what}; valid ops: {', '.join(OPS)}")


class Network(CellNet):
    """The derived net: one fixed op per cell, e.g. Network(genotype(search_net))."""

    def __init__(self, genotype, num_classes=10, widths=(16, 32, 64), cells_per_stage=3):
        check_genotype(genotype, len(widths) * cells_per_stage)
        self.genotype = list(genotype)
        super().__init__(lambda c, i: NormAct(genotype[i], c), num_classes, widths, cells_per_stage)


class BasicBlock(nn.Module):
    """ResNet basic block, conv-site1-conv-site2 with the shortcut added inside site2: a2(n2(conv2) + s).
    The second norm has no activation of its own in ResNet (ReLU follows the add), so site 2 searches
    the pair (n2, a) with a applied after the add: same 16 candidates, same topology as ResNet-18."""

    def __init__(self, site, cin, cout, stride, index):
        super().__init__()
        self.conv1, self.site1 = conv3x3(cin, cout, stride), site(cout, index)
        self.conv2, self.site2 = conv3x3(cout, cout), site(cout, index + 1)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), BatchNorm(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return self.site2(self.conv2(self.site1(self.conv1(x))), residual=self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (3x3 stem, 4 stages x 2 basic blocks, 64-512 channels, about 11.2M parameters)
    with 17 norm+activation sites (stem + 2 per block): MixedNA when searching (genotype=None), else
    the fixed ops of `genotype` (all "BN+ReLU" is the standard ResNet-18)."""

    def __init__(self, num_classes=10, genotype=None, seed=0):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)
        if genotype is None:
            def site(c, i): return MixedNA(c, generator=self.generator)
        else:
            check_genotype(genotype, RESNET18_SITES)
            self.genotype = list(genotype)
            def site(c, i): return NormAct(genotype[i], c)
        self.num_classes, self.widths = num_classes, (64, 128, 256, 512)
        self.stem, self.stem_site = conv3x3(3, 64), site(64, 0)
        blocks, cin = [], 64
        for s, width in enumerate(self.widths):
            for b in range(2):
                blocks.append(BasicBlock(site, cin, width, 2 if s > 0 and b == 0 else 1, 1 + 2 * len(blocks)))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.blocks(self.stem_site(self.stem(x))).mean((2, 3)))


RESNET18_SITES = 17
BACKBONES = ("cells", "resnet18")


def num_sites(backbone, widths=(16, 32, 64), cells_per_stage=3):
    return RESNET18_SITES if backbone == "resnet18" else len(widths) * cells_per_stage


def build_model(backbone="cells", genotype=None, num_classes=10, widths=(16, 32, 64), seed=0):
    """The search net (genotype=None) or the derived net of a backbone ("cells": the paper's 9-cell net)."""
    if backbone == "resnet18":
        return ResNet18(num_classes, genotype, seed)
    if backbone != "cells":
        raise ValueError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
    if genotype is None:
        return SearchNet(num_classes, widths, seed=seed)
    return Network(genotype, num_classes, widths)


# ----------------------------------------------------------------------------------------------------
# 6. Bilevel search (eq 2): min_alpha L_val(w*(alpha), alpha), w*(alpha) = argmin_w L_train(w, alpha)

def arch_parameters(model):
    """alpha of every MixedNA (the upper level of eq 2)."""
    return [m.alpha for m in mixed_ops(model)]


def weight_parameters(model):
    """Everything else: convs, affine gamma/beta, classifier (the lower level of eq 2)."""
    arch = {id(p) for p in arch_parameters(model)}
    return [p for p in model.parameters() if id(p) not in arch]


def make_optimizers(model, lr=1e-3, arch_lr=3e-4, arch_betas=(0.5, 0.999), arch_weight_decay=1e-3):
    """Adam 1e-3 for the weights (the paper), DARTS' Adam for alpha."""
    return (torch.optim.Adam(weight_parameters(model), lr=lr),
            torch.optim.Adam(arch_parameters(model), lr=arch_lr, betas=arch_betas, weight_decay=arch_weight_decay))


def train_step(model, x, y, optimizer):
    """One step of `optimizer` on cross-entropy, computing gradients only for its own parameters.
    Returns (loss, number correct) as tensors, without a device sync."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads):
        p.grad = g  # None for the candidates not sampled this step: Adam leaves them untouched
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == y).sum()


def bilevel_step(model, train_batch, val_batch, weight_opt, arch_opt):
    """eq 2, first order and alternating: one weight step on a train batch (alpha fixed), then one alpha
    step on a validation batch (weights fixed). Each step samples its own S(k) (eq 4).
    Returns (train loss, train correct, val loss, val correct) as tensors."""
    model.train()
    train = train_step(model, *train_batch, weight_opt)  # w <- w - lr grad_w L_train(w, alpha)
    val = train_step(model, *val_batch, arch_opt)  # alpha <- alpha - lr grad_alpha L_val(w, alpha)
    return (*train, *val)


def parse_k_schedule(spec):
    """"fixed:K", "linear:K0:K1" -> ("fixed", K, K) / ("linear", K0, K1); ValueError otherwise."""
    kind, *parts = spec.split(":")
    ks = [int(p) for p in parts if p.isdigit()]
    if len(ks) != len(parts):
        ks = []
    if not ((kind == "fixed" and len(ks) == 1) or (kind == "linear" and len(ks) == 2)) or \
            not all(1 <= k <= len(OPS) for k in ks):
        raise ValueError(f"bad k schedule {spec!r}: use fixed:K or linear:K0:K1 with 1 <= K <= {len(OPS)}")
    return kind, ks[0], ks[-1]


def k_at(spec, epoch, epochs):
    """k for `epoch` (0-based) of `epochs`. linear:K0:K1 walks K0..K1 in equal shares of the epochs
    (linear:2:4 over 50 epochs: k = 2 for epochs 0-16, 3 for 17-33, 4 for 34-49); works downward too."""
    _, k0, k1 = parse_k_schedule(spec)
    values = range(k0, k1 + 1) if k1 >= k0 else range(k0, k1 - 1, -1)
    return values[epoch * len(values) // epochs]


TAU_START, TAU_DECAY = 5.0, 0.045  # FBNet's schedule, cited by the paper: tau = 5 * exp(-0.045 epoch)


def tau_at(epoch, start=TAU_START, decay=TAU_DECAY):
    """tau for `epoch`: high to low, start * exp(-decay * epoch) (5.0 -> 0.55 over 50 epochs)."""
    return start * math.exp(-decay * epoch)


def set_schedule(model, k, tau):
    for m in mixed_ops(model):
        m.k, m.tau = k, tau


# ----------------------------------------------------------------------------------------------------
# 7. Data: the raw CIFAR python batches, unpickled safely, resident as uint8 tensors

CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    meta="batches.meta", labels=b"labels", names=b"label_names"),
    "cifar100": dict(folder="cifar-100-python", archive="cifar-100-python.tar.gz",
                     url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85",
                     train=["train"], test=["test"], meta="meta", labels=b"fine_labels", names=b"fine_label_names"),
}

try:  # what the batches' pickles reference to rebuild their numpy arrays
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

_SAFE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
                 ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
                 ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class _BatchUnpickler(pickle.Unpickler):
    """Admits only numpy array reconstruction (and pickle's basic types): a crafted file cannot run code."""

    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return _SAFE_GLOBALS[(module, name)]


def _unpickle(data, name):
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise ValueError(f"{name}: not a valid CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: not a valid CIFAR batch (a {type(obj).__name__}, expected a dict)")
    return obj


def _images_labels(obj, spec, name):
    x, y = obj.get(b"data"), obj.get(spec["labels"])
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 \
            or not isinstance(y, list) or len(y) != len(x):
        raise ValueError(f"{name}: malformed CIFAR batch (expected uint8 data of shape (N, 3072) and N labels)")
    return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.tensor(y, dtype=torch.int64)


def _download(url, path, md5):
    """Fetch url to path via a temporary file, checking md5; a one-line error if that fails."""
    tmp, digest = path + ".part", hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                digest.update(chunk)
                f.write(chunk)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise FileNotFoundError(f"could not download {url} ({getattr(e, 'reason', e)}); put "
                                f"{os.path.basename(path)} (or its extracted folder) in {os.path.dirname(path)}") from None
    if md5 and digest.hexdigest() != md5:
        os.remove(tmp)
        raise ValueError(f"{url}: md5 {digest.hexdigest()} != expected {md5}; download removed")
    os.replace(tmp, path)


def load_cifar(root="data", dataset="cifar10", download=True, url=None):
    """CIFAR-10 or CIFAR-100 (fine labels) from root/<folder>/ (extracted) or root/<archive>.tar.gz.

    Downloads the official archive (md5-checked) only if neither is present and download=True; `url`
    overrides the address (e.g. a mirror or a file:// URL, md5 not enforced then). Returns a dict of
    uint8 tensors train_x (50000, 3, 32, 32), test_x, int64 train_y, test_y, and the class names.
    """
    if dataset not in CIFAR:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(CIFAR)}")
    spec = CIFAR[dataset]
    folder, archive = os.path.join(root, spec["folder"]), os.path.join(root, spec["archive"])
    if os.path.isdir(folder):
        def read(name):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: missing from the extracted {spec['folder']}/")
            with open(path, "rb") as f:
                return f.read(), path
    else:
        if not os.path.isfile(archive):
            if not download:
                raise FileNotFoundError(f"{dataset} not found: put {spec['archive']} or the extracted "
                                        f"{spec['folder']}/ in {os.path.abspath(root)} (downloads are off)")
            os.makedirs(root, exist_ok=True)
            _download(url or spec["url"], archive, None if url else spec["md5"])
        try:
            tar = tarfile.open(archive, "r:gz")
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"{archive}: not a readable .tar.gz ({e})") from None

        def read(name):
            member = f"{spec['folder']}/{name}"
            try:
                return tar.extractfile(member).read(), f"{archive}:{member}"
            except KeyError:
                raise FileNotFoundError(f"{archive}: has no {member}") from None
            except (tarfile.TarError, OSError, EOFError) as e:
                raise ValueError(f"{archive}:{member}: truncated or corrupt archive ({e})") from None

    out = {}
    for split in ("train", "test"):
        parts = []
        for name in spec[split]:
            data, where = read(name)
            parts.append(_images_labels(_unpickle(data, where), spec, where))
        out[f"{split}_x"], out[f"{split}_y"] = (torch.cat(t) for t in zip(*parts))
    data, where = read(spec["meta"])
    names = _unpickle(data, where).get(spec["names"])
    if not isinstance(names, list):
        raise ValueError(f"{where}: malformed meta file (no {spec['names'].decode()})")
    out["classes"] = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    num_classes = len(out["classes"])
    for split in ("train", "test"):
        y = out[f"{split}_y"]
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{dataset} {split} labels outside 0..{num_classes - 1}")
    return out


def channel_stats(x):
    """Per-channel mean and std of uint8 images, in [0, 1] units: the input normalization."""
    x = x.double() / 255
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()


class Batches:
    """Mini-batches (x float normalised, y) drawn from uint8 images already on the training device.

    The order comes from `generator` (a CPU torch.Generator, so it is saved and restored with the
    checkpoint); `augment` adds the usual 4-pixel-pad random crop and horizontal flip (the paper: none).
    `len()` batches per pass; `drop_last` drops a final short batch.
    """

    def __init__(self, x, y, batch_size, mean, std, shuffle=True, augment=False, generator=None, drop_last=False):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.generator = generator if generator is not None else torch.Generator()
        std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        self.scale = 1 / (255 * std)  # (x / 255 - mean) / std = x * scale + shift
        self.shift = -torch.tensor(mean, device=x.device).view(1, 3, 1, 1) / std

    def __len__(self):
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.x.device)
        for b in range(len(self)):
            i = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.x[i]
            if self.augment:
                x = self.crop_flip(x)
            yield x.float() * self.scale + self.shift, self.y[i]

    def crop_flip(self, x):
        B = len(x)
        dy, dx, flip = (torch.randint(0, 9, (B,), generator=self.generator) for _ in range(3))
        dy, dx, flip = dy.to(x.device), dx.to(x.device), (flip < 4).to(x.device)
        r = torch.arange(32, device=x.device)
        rows = (dy[:, None] + r)[:, None, :, None]
        cols = (dx[:, None] + torch.where(flip[:, None], 31 - r, r))[:, None, None, :]
        return F.pad(x, (4, 4, 4, 4))[torch.arange(B, device=x.device)[:, None, None, None],
                                      torch.arange(3, device=x.device)[None, :, None, None], rows, cols]


def split_indices(n, val_fraction=0.1, seed=0):
    """A seeded random split of range(n) into (train, val) index tensors (the paper: 90/10)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


@torch.no_grad()
def evaluate(model, batches):
    """(mean loss, accuracy) of model in eval mode over batches."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in batches:
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    return loss / max(n, 1), correct / max(n, 1)


# ----------------------------------------------------------------------------------------------------
# 8. Reproducible runs: devices, random states, atomic checkpoints, run folders (used by the scripts)

def pick_device(name="auto"):
    """"auto": cuda, then mps, then cpu; otherwise the named device."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def rng_state(**generators):
    """Every random state a run depends on, in a form torch.load(weights_only=True) accepts."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(mt), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "generators": {name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, **generators):
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def write_atomic(path, data):
    """Write bytes (or text) to a temporary file, then rename: a kill at any moment leaves the old file
    or the new one, never half of one."""
    with open(f"{path}.tmp", "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)


def save_atomic(obj, path):
    """torch.save, atomically (see write_atomic)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())


UNCHECKED_KEYS = ("out", "resume", "overwrite", "device", "data", "no_download")  # may change on resume


def open_run(out, config, resume=False, overwrite=False, device="cpu", artefacts=()):
    """Prepare run folder `out`; returns the checkpoint to resume from, or None for a fresh run.
    Refuses (SystemExit, one line) to reuse a folder without resume/overwrite, to resume without a
    checkpoint, and to resume a checkpoint whose config differs (naming the keys)."""
    ckpt_path = os.path.join(out, "checkpoint.pt")
    if resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"error: --resume: no checkpoint.pt in {out} (the run stopped before its first "
                             "epoch ended); start it again with --overwrite")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        old = ckpt["config"]
        differ = sorted(k for k in set(old) | set(config)
                        if k not in UNCHECKED_KEYS and old.get(k) != config.get(k))
        if differ:
            raise SystemExit("error: --resume: the checkpoint's config differs in " +
                             ", ".join(f"{k} ({old.get(k)!r} there, {config.get(k)!r} now)" for k in differ))
        return ckpt
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise SystemExit(f"error: {out} exists and is not empty; use --resume to continue it or --overwrite to replace it")
    os.makedirs(out, exist_ok=True)
    for name in artefacts:  # --overwrite: no stale file of the old run survives to be mistaken as new
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    return None


def saved_tensor_bytes(fn):
    """Run fn() and return (its result, bytes autograd keeps for backward), each storage counted once
    (k candidates reading the same x share one), parameters excluded: the activation memory of a step."""
    storages = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            s = t.untyped_storage()
            storages[(s.data_ptr(), t.device)] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def median_ms(fn, repeats=20, warmup=5, device="cpu"):
    """Median wall time of fn() in milliseconds, after warm-up, synchronising CUDA around each call."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]
