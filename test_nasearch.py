"""Tests for nasearch.py and the scripts: `python -m pytest -q` (synthetic data only, no network)."""
import itertools
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nasearch as ns
import retrain
import search

HERE = os.path.dirname(os.path.abspath(__file__))

TABLE1 = ["BN+GELU", "GN+GELU", "GN+GELU", "LN+GELU", "BN+Swish", "BN+Swish", "BN+Swish", "BN+Swish", "GN+GELU"]


def count_params(model):
    return sum(p.numel() for p in ns.weight_parameters(model))


# ---------------------------------------------------------------------------------------------------
# Synthetic CIFAR files in the official format: Python 2 cPickle protocol 2, byte-string keys,
# numpy arrays pickled through numpy.core.multiarray._reconstruct (as the real batches are).

def py2_pickle(obj):
    out = [b"\x80\x02"]

    def w(o):
        if isinstance(o, bool) or o is None:
            out.append({None: b"N", True: b"\x88", False: b"\x89"}[o])
        elif isinstance(o, int):
            out.append(b"J" + struct.pack("<i", o))
        elif isinstance(o, bytes):
            out.append(b"T" + struct.pack("<i", len(o)) + o)
        elif isinstance(o, tuple):
            out.append(b"(")
            for x in o:
                w(x)
            out.append(b"t")
        elif isinstance(o, list):
            out.append(b"](")
            for x in o:
                w(x)
            out.append(b"e")
        elif isinstance(o, dict):
            out.append(b"}(")
            for k, v in o.items():
                w(k)
                w(v)
            out.append(b"u")
        elif isinstance(o, np.ndarray):
            out.append(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            w((0,))
            w(b"b")
            out.append(b"\x87R(")
            w(1)
            w(tuple(o.shape))
            out.append(b"cnumpy\ndtype\n")
            w((b"u1", 0, 1))
            out.append(b"R")
            w((3, b"|", None, None, None, -1, -1, 0))
            out.append(b"b\x89")  # BUILD the dtype, then False (not Fortran order)
            w(o.tobytes())
            out.append(b"tb")
        else:
            raise TypeError(type(o))

    w(obj)
    return b"".join(out) + b"."


def make_cifar(root, dataset="cifar10", n_train=200, n_test=100, tar=False, seed=0):
    """Write a tiny dataset whose class is readable from the image (mean colour), so nets can learn it."""
    spec = ns.CIFAR[dataset]
    num_classes = 10 if dataset == "cifar10" else 100
    rng = np.random.default_rng(seed)

    def batch(n):
        y = rng.integers(0, num_classes, n)
        x = rng.integers(0, 64, (n, 3, 32, 32)) + (y * 191 // max(num_classes - 1, 1))[:, None, None, None]
        return {b"batch_label": b"synthetic", spec["labels"]: [int(v) for v in y],
                b"data": np.ascontiguousarray(x.reshape(n, 3072).astype(np.uint8)),
                b"filenames": [b"img_%d.png" % i for i in range(n)]}

    files = {}
    per = -(-n_train // len(spec["train"]))
    for name in spec["train"]:
        files[name] = batch(per)
    files[spec["test"][0]] = batch(n_test)
    files[spec["meta"]] = {spec["names"]: [b"class_%d" % i for i in range(num_classes)]}
    folder = os.path.join(root, spec["folder"])
    os.makedirs(folder, exist_ok=True)
    for name, obj in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(py2_pickle(obj))
    if tar:
        with tarfile.open(os.path.join(root, spec["archive"]), "w:gz") as t:
            t.add(folder, arcname=spec["folder"])
        for name in files:
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)
    return files


# ---------------------------------------------------------------------------------------------------
# Search space (eq 3): hand-written norms and activations against torch's own ops

def _compare(ours, ref, inputs, atol=1e-9):
    """Same value and same gradient for every input, under a random upstream gradient."""
    y1, y2 = ours(*inputs), ref(*inputs)
    torch.testing.assert_close(y1, y2, atol=atol, rtol=1e-7)
    g = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, inputs, g)
    g2 = torch.autograd.grad(y2, inputs, g)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-6)


def _inputs(C=16, N=4, H=5, W=6):
    torch.manual_seed(0)
    x = (torch.randn(N, C, H, W, dtype=torch.double) * 3 + 1).requires_grad_()
    gamma = (torch.rand(C, dtype=torch.double) + 0.5).requires_grad_()
    beta = torch.randn(C, dtype=torch.double).requires_grad_()
    return x, gamma, beta


@pytest.mark.parametrize("C", [16, 32, 64, 128])
def test_norms_match_torch_in_value_and_gradient(C):
    x, gamma, beta = _inputs(C, H=3, W=4)
    _compare(lambda x, g, b: ns.group_norm(x, ns.GN_GROUPS, g, b),
             lambda x, g, b: F.group_norm(x, ns.GN_GROUPS, g, b, ns.EPS), (x, gamma, beta))
    _compare(lambda x, g, b: ns.group_norm(x, C, g, b),
             lambda x, g, b: F.instance_norm(x, weight=g, bias=b, eps=ns.EPS), (x, gamma, beta))
    _compare(lambda x, g, b: ns.group_norm(x, 1, g, b),  # LN: per sample over C, H, W; per-channel affine
             lambda x, g, b: F.layer_norm(x, x.shape[1:], eps=ns.EPS) * g.view(1, -1, 1, 1) + b.view(1, -1, 1, 1),
             (x, gamma, beta))
    _compare(lambda x, g, b: ns.batch_norm(x, g, b, None, None, True),
             lambda x, g, b: F.batch_norm(x, None, None, g, b, True, 0.1, ns.EPS), (x, gamma, beta))


def test_batch_norm_running_statistics_and_eval_match_torch():
    x, gamma, beta = _inputs()
    ours = ns.NormAct("BN+ReLU", 16).double()
    ref = torch.nn.BatchNorm2d(16, eps=ns.EPS).double()
    with torch.no_grad():
        ours.gamma.copy_(gamma)
        ours.beta.copy_(beta)
        ref.weight.copy_(gamma)
        ref.bias.copy_(beta)
    for step in range(3):  # train: batch statistics, running averages updated
        xs = (x.detach() * (step + 1)).requires_grad_()
        _compare(lambda x: ours(x), lambda x: F.relu(ref(x)), (xs,))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    _compare(lambda x: ours(x), lambda x: F.relu(ref(x)), (x,))  # eval: running statistics


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("op", ns.OPS)
def test_every_candidate_matches_torch_modules(op, training):
    norm, act = op.split("+")
    C = 32
    x, gamma, beta = _inputs(C)
    ours = ns.NormAct(op, C).double().train(training)
    ref_norm = {"BN": torch.nn.BatchNorm2d(C, eps=ns.EPS), "IN": torch.nn.GroupNorm(C, C, eps=ns.EPS),
                "LN": torch.nn.GroupNorm(1, C, eps=ns.EPS), "GN": torch.nn.GroupNorm(ns.GN_GROUPS, C, eps=ns.EPS)}[norm]
    ref_norm = ref_norm.double().train(training)
    ref_act = {"ReLU": F.relu, "Swish": F.silu, "GELU": F.gelu, "Mish": F.mish}[act]
    if not training and norm == "BN":  # give eval something other than the initial statistics
        ours.running_mean.uniform_(-1, 1), ours.running_var.uniform_(0.5, 2)
        ref_norm.running_mean.copy_(ours.running_mean), ref_norm.running_var.copy_(ours.running_var)
    with torch.no_grad():
        ours.gamma.copy_(gamma), ours.beta.copy_(beta)
        ref_norm.weight.copy_(gamma), ref_norm.bias.copy_(beta)
    params = (x, ours.gamma, ours.beta)
    y1, y2 = ours(x), ref_act(ref_norm(x))
    torch.testing.assert_close(y1, y2, atol=1e-9, rtol=1e-7)
    g = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, params, g)
    g2 = torch.autograd.grad(y2, (x, ref_norm.weight, ref_norm.bias), g)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("name,ref", [("ReLU", F.relu), ("Swish", F.silu), ("GELU", F.gelu), ("Mish", F.mish)])
def test_activations_match_torch(name, ref):
    torch.manual_seed(0)
    x = torch.cat([torch.randn(1000, dtype=torch.double) * 4,
                   torch.tensor([-50.0, -20.0, -1e-3, 0.5, 20.0, 50.0], dtype=torch.double)]).requires_grad_()
    _compare(lambda x: ns.activation(name, x), ref, (x,))
    with torch.no_grad():  # the plain path used for export
        torch.testing.assert_close(ns.activation(name, x), ref(x), atol=1e-9, rtol=1e-7)


def test_float32_norms_match_and_keep_one_tensor_for_backward():
    torch.manual_seed(0)
    x = torch.randn(8, 32, 8, 8, requires_grad=True)
    gamma, beta = torch.ones(32, requires_grad=True), torch.zeros(32, requires_grad=True)
    torch.testing.assert_close(ns.group_norm(x, 8, gamma, beta), F.group_norm(x, 8, gamma, beta, ns.EPS),
                               atol=1e-5, rtol=1e-5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ns.group_norm(x, 8, gamma, beta)
    big = {t.untyped_storage().data_ptr() for t in saved if t.numel() == x.numel()}
    assert big == {x.untyped_storage().data_ptr()}  # only x itself, like F.group_norm


def test_gn_needs_divisible_width():
    with pytest.raises(ValueError, match="divisible by 8"):
        ns.NormAct("GN+ReLU", 12)
    with pytest.raises(ValueError, match="valid ops"):
        ns.NormAct("BN+Tanh", 16)


# ---------------------------------------------------------------------------------------------------
# eq 1, eq 4, eq 5 and MixedNA

class CallCounter:
    def __init__(self, mixed):
        self.calls = [0] * len(ns.OPS)
        for i, op in enumerate(mixed.ops):
            op.register_forward_hook(lambda m, inp, out, i=i: self.calls.__setitem__(i, self.calls[i] + 1))


def test_eq1_darts_relaxation_is_the_softmax_weighted_sum_of_all_16():
    torch.manual_seed(0)
    m = ns.MixedNA(16, mode="darts").double()
    with torch.no_grad():
        m.alpha.copy_(torch.randn(16))
    x = torch.randn(4, 16, 5, 5, dtype=torch.double)
    counter = CallCounter(m)
    y = m(x)
    assert counter.calls == [1] * 16
    w = torch.exp(m.alpha) / torch.exp(m.alpha).sum()
    explicit = sum(w[i] * op(x) for i, op in enumerate(m.ops))
    torch.testing.assert_close(y, explicit)


def test_eq4_gumbel_topk_returns_k_distinct_indices():
    g = torch.Generator().manual_seed(0)
    alpha = torch.randn(16)
    for k in range(1, 17):
        idx = ns.gumbel_topk(alpha, k, g)
        assert idx.dtype == torch.int64 and len(idx) == k and len(set(idx.tolist())) == k
        assert all(0 <= i < 16 for i in idx.tolist())


def test_eq4_frequencies_match_sampling_without_replacement():
    alpha = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 0.2])
    p = torch.softmax(alpha, 0).double()
    g = torch.Generator().manual_seed(1234)  # fixed seed: the counts below are deterministic
    n = 20000
    ones = torch.zeros(6, dtype=torch.double)
    pairs = {}
    for _ in range(n):
        ones[ns.gumbel_topk(alpha, 1, g)] += 1
        pair = tuple(sorted(ns.gumbel_topk(alpha, 2, g).tolist()))
        pairs[pair] = pairs.get(pair, 0) + 1
    # k = 1: P(i) = softmax(alpha)_i; within 5 standard errors
    assert ((ones / n - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all()
    # k = 2: P({i, j}) = p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j)
    for i, j in itertools.combinations(range(6), 2):
        q = float(p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j]))
        assert abs(pairs.get((i, j), 0) / n - q) <= 5 * math.sqrt(q * (1 - q) / n), (i, j)


def test_eq5_weights_sum_to_one_and_follow_the_formula():
    alpha = torch.tensor([0.3, -1.2, 2.0, 0.7, 0.1])
    idx = torch.tensor([3, 0, 2])
    for tau in (5.0, 1.0, 0.3):
        w = ns.subset_softmax(alpha, idx, tau)
        expected = torch.exp(alpha[idx] / tau) / torch.exp(alpha[idx] / tau).sum()
        torch.testing.assert_close(w, expected)
        assert abs(float(w.sum()) - 1) < 1e-6
    w = ns.subset_softmax(alpha, idx, 1e-3)  # tau -> 0: one-hot on the largest alpha in S(k)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 1.0]))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_eq5_computes_and_trains_only_the_k_sampled_candidates(k):
    torch.manual_seed(0)
    m = ns.MixedNA(16, k=k, tau=2.0, generator=torch.Generator().manual_seed(k))
    counter = CallCounter(m)
    x = torch.randn(4, 16, 5, 5)
    y = m(x)
    ran = [i for i, c in enumerate(counter.calls) if c]
    assert len(ran) == k and all(c <= 1 for c in counter.calls)
    y.square().sum().backward()
    for i, op in enumerate(m.ops):
        assert (op.gamma.grad is not None) == (i in ran)
    assert set(torch.nonzero(m.alpha.grad).flatten().tolist()) <= set(ran)
    # and the output is eq 5 over exactly those candidates
    with torch.no_grad():
        m.generator.manual_seed(k)  # replay the same draw of S(k), in its order
        idx = ns.gumbel_topk(m.alpha, k, m.generator)
        w = ns.subset_softmax(m.alpha, idx, 2.0)
        torch.testing.assert_close(y, sum(w[j] * m.ops[i](x) for j, i in enumerate(idx.tolist())))


def test_k16_with_tau1_reproduces_eq1():
    torch.manual_seed(0)
    m = ns.MixedNA(16, k=16, tau=1.0, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        m.alpha.copy_(torch.randn(16))
    x = torch.randn(4, 16, 5, 5, dtype=torch.double)
    y_sample = m(x)
    m.mode = "darts"
    torch.testing.assert_close(y_sample, m(x))


def test_eval_is_deterministic_top_k_without_noise():
    m = ns.MixedNA(16, k=1).eval()
    with torch.no_grad():
        m.alpha.copy_(torch.arange(16.0))
    counter = CallCounter(m)
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(m(x), m(x))
    assert counter.calls[15] == 2 and sum(counter.calls) == 2  # k = 1 in eval: the derived op, alone
    torch.testing.assert_close(m(x), m.ops[15](x))


def test_recompute_mode_gives_identical_outputs_gradients_and_statistics():
    def run(recompute):
        torch.manual_seed(0)
        net = ns.SearchNet(seed=3)
        ns.set_schedule(net, 4, 1.5)
        for m in ns.mixed_ops(net):
            m.recompute = recompute
        x = torch.randn(8, 3, 32, 32)
        out = net(x)
        out.square().mean().backward()
        grads = [p.grad.clone() if p.grad is not None else None for p in net.parameters()]
        return out.detach(), grads, [b.clone() for b in net.buffers()]

    out1, g1, b1 = run(False)
    out2, g2, b2 = run(True)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(b1, b2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # BN running statistics counted once


def test_mixed_na_is_a_drop_in_for_any_model():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), ns.MixedNA(8, k=3), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert ns.genotype(model)[0] in ns.OPS and len(ns.arch_parameters(model)) == 1


# ---------------------------------------------------------------------------------------------------
# Networks

def test_parameter_counts_match_the_paper():
    assert count_params(ns.Network(TABLE1)) == 123_898  # Table 2: 0.124M
    n100 = count_params(ns.Network(TABLE1, num_classes=100, widths=(32, 64, 128)))
    assert n100 == 503_620 and round(n100 / 1e6, 2) == 0.50  # Table 4 text: 0.50M
    # every candidate has the same parameter count, so any genotype gives the same total
    assert count_params(ns.Network(["IN+Mish"] * 9)) == 123_898


def test_search_net_structure_and_genotype():
    net = ns.SearchNet()
    assert len(ns.mixed_ops(net)) == 9
    strides = [c.stride[0] for c in net.convs]
    assert strides == [1, 1, 1, 2, 1, 1, 2, 1, 1]
    assert [c.out_channels for c in net.convs] == [16] * 3 + [32] * 3 + [64] * 3
    with torch.no_grad():
        for i, m in enumerate(ns.mixed_ops(net)):
            m.alpha.zero_()
            m.alpha[ns.OPS.index(TABLE1[i])] = 1.0
    assert ns.genotype(net) == TABLE1
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    derived = ns.Network(ns.genotype(net))
    assert [s.op for s in derived.sites] == TABLE1


def test_bad_genotype_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="valid ops: BN\\+ReLU"):
        ns.Network(["BN+ReLU"] * 8)
    with pytest.raises(ValueError, match="unknown op"):
        ns.Network(["BN+ReLU"] * 8 + ["XX+ReLU"])


def test_bilevel_step_updates_weights_on_train_and_alpha_on_val():
    torch.manual_seed(0)
    net = ns.SearchNet(seed=0)
    w_opt, a_opt = ns.make_optimizers(net)
    assert a_opt.defaults["lr"] == 3e-4 and a_opt.defaults["betas"] == (0.5, 0.999)
    assert w_opt.defaults["lr"] == 1e-3 and a_opt.defaults["weight_decay"] == 1e-3
    alpha0 = [a.detach().clone() for a in ns.arch_parameters(net)]
    conv0 = net.convs[0].weight.detach().clone()
    batch = (torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    # with a zero alpha learning rate, only the weights move; with zero weight lr only alpha moves
    a_opt.param_groups[0]["lr"] = 0.0
    ns.bilevel_step(net, batch, batch, w_opt, a_opt)
    assert all(torch.equal(a, b) for a, b in zip(alpha0, ns.arch_parameters(net)))
    assert not torch.equal(conv0, net.convs[0].weight)
    a_opt.param_groups[0]["lr"], w_opt.param_groups[0]["lr"] = 3e-4, 0.0
    conv1 = net.convs[0].weight.detach().clone()
    out = ns.bilevel_step(net, batch, batch, w_opt, a_opt)
    assert torch.equal(conv1, net.convs[0].weight)
    assert not all(torch.equal(a, b) for a, b in zip(alpha0, ns.arch_parameters(net)))
    assert len(out) == 4 and all(torch.isfinite(t) for t in out)


def test_schedules():
    assert [ns.k_at("linear:2:4", e, 50) for e in (0, 16, 17, 33, 34, 49)] == [2, 2, 3, 3, 4, 4]
    assert [ns.k_at("linear:4:2", e, 6) for e in range(6)] == [4, 4, 3, 3, 2, 2]
    assert {ns.k_at("fixed:3", e, 10) for e in range(10)} == {3}
    assert ns.k_at("linear:2:4", 0, 1) == 2
    for bad in ("3", "fixed", "linear:2", "fixed:0", "fixed:17", "cubic:1:2", "fixed:x"):
        with pytest.raises(ValueError, match="bad k schedule"):
            ns.parse_k_schedule(bad)
    assert ns.tau_at(0) == 5.0 and abs(ns.tau_at(49) - 5 * math.exp(-0.045 * 49)) < 1e-12
    taus = [ns.tau_at(e) for e in range(50)]
    assert all(a > b for a, b in zip(taus, taus[1:]))
    assert ns.tau_at(2, start=1.0, decay=0.0) == 1.0


# ---------------------------------------------------------------------------------------------------
# Data

@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("tar", [False, True])
def test_loader_reads_the_official_formats(tmp_path, dataset, tar):
    files = make_cifar(str(tmp_path), dataset, n_train=50, n_test=20, tar=tar)
    d = ns.load_cifar(str(tmp_path), dataset, download=False)
    spec = ns.CIFAR[dataset]
    n_train = 50 if dataset == "cifar100" else 50  # 5 batches of 10 or one of 50
    assert d["train_x"].shape == (n_train, 3, 32, 32) and d["train_x"].dtype == torch.uint8
    assert d["test_x"].shape == (20, 3, 32, 32) and d["test_y"].dtype == torch.int64
    first = files[spec["train"][0]]
    assert torch.equal(d["train_x"][0], torch.from_numpy(first[b"data"][0].reshape(3, 32, 32)))
    assert d["train_y"][: len(first[spec["labels"]])].tolist() == first[spec["labels"]]
    assert len(d["classes"]) == (10 if dataset == "cifar10" else 100) and d["classes"][1] == "class_1"


def test_loader_refuses_truncated_and_malicious_files(tmp_path):
    make_cifar(str(tmp_path), n_train=50, n_test=20)
    folder = tmp_path / "cifar-10-batches-py"
    data = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="data_batch_3.*not a valid CIFAR batch"):
        ns.load_cifar(str(tmp_path), download=False)
    (folder / "data_batch_3").write_bytes(b"\x80\x02cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(ValueError, match="data_batch_3.*refusing to load global os.system"):
        ns.load_cifar(str(tmp_path), download=False)
    (folder / "data_batch_3").write_bytes(py2_pickle({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}))
    with pytest.raises(ValueError, match="data_batch_3.*malformed"):
        ns.load_cifar(str(tmp_path), download=False)


def test_loader_refuses_a_truncated_archive(tmp_path):
    make_cifar(str(tmp_path), n_train=50, n_test=20, tar=True)
    path = tmp_path / "cifar-10-python.tar.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz"):
        ns.load_cifar(str(tmp_path), download=False)


def test_missing_data_offline_and_download_from_a_url(tmp_path):
    with pytest.raises(FileNotFoundError, match="put cifar-10-python.tar.gz or the extracted cifar-10-batches-py"):
        ns.load_cifar(str(tmp_path / "none"), download=False)
    with pytest.raises(FileNotFoundError, match="could not download .*put cifar-10-python.tar.gz"):
        ns.load_cifar(str(tmp_path / "none"), url=(tmp_path / "nowhere.tar.gz").as_uri())
    src = tmp_path / "mirror"
    make_cifar(str(src), n_train=50, n_test=20, tar=True)
    dst = tmp_path / "data"
    d = ns.load_cifar(str(dst), url=(src / "cifar-10-python.tar.gz").as_uri())
    assert (dst / "cifar-10-python.tar.gz").exists() and len(d["train_y"]) == 50
    with pytest.raises(ValueError, match="md5"):
        ns._download((src / "cifar-10-python.tar.gz").as_uri(), str(tmp_path / "x.tar.gz"), "0" * 32)
    assert not (tmp_path / "x.tar.gz").exists() and not (tmp_path / "x.tar.gz.part").exists()


def test_batches_normalise_and_augment():
    x = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(10)
    mean, std = ns.channel_stats(x)
    b = ns.Batches(x, y, 4, mean, std, shuffle=False)
    xb, yb = next(iter(b))
    assert len(b) == 3 and yb.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(xb, (x[:4].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) /
                               torch.tensor(std).view(1, 3, 1, 1))
    aug = ns.Batches(x, y, 10, mean, std, shuffle=False, augment=True, generator=torch.Generator().manual_seed(0))
    xa = aug.crop_flip(x)
    assert xa.shape == x.shape and xa.dtype == torch.uint8
    # each augmented image is a shifted (possibly flipped) window of the zero-padded original
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(10):
        windows = [padded[i, :, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(xa[i], w) or torch.equal(xa[i], w.flip(2)) for w in windows)
    tr, va = ns.split_indices(100, 0.1, seed=0)
    assert len(tr) == 90 and len(va) == 10 and len(set(tr.tolist()) | set(va.tolist())) == 100


# ---------------------------------------------------------------------------------------------------
# search.py and retrain.py, end to end on tiny synthetic data



@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_cifar(str(root), n_train=300, n_test=100)
    return str(root)


def search_args(data, out, *extra):
    return ["--data", data, "--no-download", "--batch-size", "32", "--device", "cpu", "--out", str(out), *extra]


def test_search_then_retrain_end_to_end(tiny_data, tmp_path, capsys):
    run = tmp_path / "search"
    geno = search.main(search_args(tiny_data, run, "--epochs", "2"))
    out = capsys.readouterr().out
    assert "Table 1" in out and "epoch 2/2" in out
    config = json.loads((run / "config.json").read_text())
    assert config["k"] == "linear:2:4" and config["epochs"] == 2 and config["lr"] == 1e-3
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and [r["k"] for r in rows] == [2, 3]
    assert rows[0]["tau"] == 5.0 and rows[1]["tau"] < 5.0
    for r in rows:
        assert len(r["alpha_softmax"]) == 9 and all(abs(sum(p) - 1) < 1e-5 and len(p) == 16 for p in r["alpha_softmax"])
        assert {"train_loss", "train_acc", "val_loss", "val_acc", "seconds", "genotype"} <= set(r)
    saved = json.loads((run / "genotype.json").read_text())
    assert saved["genotype"] == geno == rows[-1]["genotype"] and saved["backbone"] == "cells"
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2
    from PIL import Image
    with Image.open(run / "alpha.png") as img:
        assert img.format == "PNG" and img.width > 16 * 40 and img.height > 9 * 20
    table = (run / "table1.txt").read_text().splitlines()
    assert [line.split(None, 1)[1].replace(" + ", "+") for line in table[1:]] == geno

    rrun = tmp_path / "retrain"
    result = retrain.main(search_args(tiny_data, rrun, "--genotype", str(run / "genotype.json"), "--epochs", "1"))
    out = capsys.readouterr().out
    assert "Table 2/3 row" in out and "not a fair number" in out
    saved_result = json.loads((rrun / "result.json").read_text())
    assert saved_result["params"] == 123_898 and saved_result["genotype"] == geno
    assert 0 <= saved_result["top1"] <= 100 and saved_result["latency_ms_batch1"] > 0
    assert saved_result["peak_train_memory_MB"] > 0
    model_file = torch.load(rrun / "model.pt", weights_only=True)
    assert model_file["genotype"] == geno and model_file["classes"][0] == "class_0"
    net = ns.build_model(model_file["backbone"], model_file["genotype"], model_file["num_classes"], model_file["widths"])
    net.load_state_dict(model_file["state_dict"])
    assert abs(model_file["test_acc"] * 100 - result["top1"]) < 1e-9
    d = ns.load_cifar(tiny_data, download=False)  # the saved model reproduces the recorded accuracy
    test = ns.Batches(d["test_x"], d["test_y"], 500, model_file["mean"], model_file["std"], shuffle=False)
    assert ns.evaluate(net, test)[1] == model_file["test_acc"]
    assert len((rrun / "log.jsonl").read_text().splitlines()) == 1


def _run_search(data, out, epochs):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "search.py"),
                             *search_args(data, out, "--epochs", str(epochs), "--subset", "200")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=HERE)


def test_kill_minus_9_then_resume_gives_the_same_alpha(tiny_data, tmp_path):
    epochs = 5
    full, killed = tmp_path / "full", tmp_path / "killed"
    a = _run_search(tiny_data, full, epochs)
    b = _run_search(tiny_data, killed, epochs)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # somewhere in epoch 2
    b.send_signal(signal.SIGKILL)
    assert b.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert a.wait() == 0, a.stderr.read().decode()
    killed_at = torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= killed_at < epochs
    c = subprocess.run([sys.executable, os.path.join(HERE, "search.py"),
                        *search_args(tiny_data, killed, "--epochs", str(epochs), "--subset", "200", "--resume")],
                       capture_output=True, text=True, cwd=HERE)
    assert c.returncode == 0, c.stderr
    assert f"resuming {killed} after epoch {killed_at}" in c.stdout
    ca, cb = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (full, killed))
    alphas = [k for k in ca["model"] if k.endswith("alpha")]
    assert len(alphas) == 9
    for k in alphas:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    assert (full / "genotype.json").read_text() == (killed / "genotype.json").read_text()
    assert [r["epoch"] for r in map(json.loads, (killed / "log.jsonl").read_text().splitlines())] == list(range(1, epochs + 1))


def test_refusals(tiny_data, tmp_path):
    run = tmp_path / "run"
    search.main(search_args(tiny_data, run, "--epochs", "1", "--subset", "100"))
    with pytest.raises(SystemExit, match="exists and is not empty; use --resume .* or --overwrite"):
        search.main(search_args(tiny_data, run, "--epochs", "1", "--subset", "100"))
    with pytest.raises(SystemExit, match="config differs in .*lr \\(0.001 there, 0.01 now\\)"):
        search.main(search_args(tiny_data, run, "--epochs", "1", "--subset", "100", "--lr", "0.01", "--resume"))
    with pytest.raises(SystemExit, match="unknown op\\(s\\) 'BN\\+Tanh'; valid ops: BN\\+ReLU, BN\\+Swish"):
        retrain.main(search_args(tiny_data, tmp_path / "r1", "--genotype", "BN+Tanh"))
    with pytest.raises(SystemExit, match="3 ops, expected 9; valid ops"):
        retrain.main(search_args(tiny_data, tmp_path / "r2", "--genotype", "BN+ReLU,GN+GELU,LN+Mish"))
    with pytest.raises(SystemExit, match="--k: bad k schedule"):
        search.main(search_args(tiny_data, tmp_path / "s", "--k", "linear:2"))
    with pytest.raises(SystemExit, match="--resume: no checkpoint.pt"):
        search.main(search_args(tiny_data, tmp_path / "nothing", "--resume"))
    search.main(search_args(tiny_data, run, "--epochs", "1", "--subset", "100", "--overwrite"))  # explicit: allowed


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    search.main(search_args(tiny_data, run, "--epochs", "1", "--subset", "100"))
    good = (run / "checkpoint.pt").read_bytes()
    real_step = ns.bilevel_step

    def nan_step(*a):
        out = real_step(*a)
        return (out[0] * float("nan"), *out[1:])

    monkeypatch.setattr(ns, "bilevel_step", nan_step)
    with pytest.raises(SystemExit, match="training loss became nan in epoch 1.*last good checkpoint"):
        search.main(search_args(tiny_data, tmp_path / "run2", "--epochs", "2", "--subset", "100"))
    assert not (tmp_path / "run2" / "checkpoint.pt").exists()
    monkeypatch.setattr(ns, "bilevel_step", real_step)
    # a run with a good epoch 1 keeps it when epoch 2 fails
    calls = {"n": 0}

    def nan_later(*a):
        calls["n"] += 1
        out = real_step(*a)
        return (out[0] * float("nan"), *out[1:]) if calls["n"] > 4 else out

    monkeypatch.setattr(ns, "bilevel_step", nan_later)
    run3 = tmp_path / "run3"
    with pytest.raises(SystemExit, match="in epoch 2.*epoch 1\\) is intact"):
        search.main(search_args(tiny_data, run3, "--epochs", "2", "--subset", "100"))
    assert torch.load(run3 / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert good  # the first run's checkpoint was untouched by the others
    assert (run / "checkpoint.pt").read_bytes() == good


# ---------------------------------------------------------------------------------------------------
# ResNet-18 backbone

def test_resnet18_parameters_search_and_round_trip():
    assert count_params(ns.ResNet18(genotype=["BN+ReLU"] * 17)) == 11_173_962  # the CIFAR ResNet-18
    torch.manual_seed(0)
    net = ns.ResNet18(num_classes=10, seed=0)
    sites = ns.mixed_ops(net)
    assert len(sites) == ns.RESNET18_SITES == 17
    assert count_params(net) == 11_173_962 + 15 * sum(2 * m.ops[0].gamma.numel() for m in sites)
    ns.set_schedule(net, 2, 1.0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    F.cross_entropy(net(x), y).backward()
    assert all(m.alpha.grad is not None and m.alpha.grad.count_nonzero() <= 2 for m in sites)
    geno = ns.genotype(net)
    derived = ns.build_model("resnet18", geno)
    assert len(geno) == 17 and derived.genotype == geno
    assert [m.op for m in derived.modules() if isinstance(m, ns.NormAct)] == geno
    assert count_params(derived) == 11_173_962


def test_resnet18_second_site_applies_its_activation_after_the_residual_add():
    block = ns.BasicBlock(lambda c, i: ns.NormAct("GN+Mish", c), 8, 8, 1, 0).eval()
    x = torch.randn(2, 8, 6, 6)
    inner = block.site1(block.conv1(x))
    expected = ns.mish(ns.group_norm(block.conv2(inner), ns.GN_GROUPS, block.site2.gamma, block.site2.beta) + x)
    torch.testing.assert_close(block(x), expected)


def test_retrain_refuses_a_genotype_of_another_backbone(tmp_path, tiny_data):
    path = tmp_path / "genotype.json"
    path.write_text(json.dumps({"genotype": ["BN+ReLU"] * 17, "backbone": "resnet18"}))
    with pytest.raises(SystemExit, match="is a resnet18 genotype, not cells; use --backbone resnet18"):
        retrain.main(search_args(tiny_data, tmp_path / "r", "--genotype", str(path), "--backbone", "cells"))
    with pytest.raises(SystemExit, match="9 ops, expected 17"):
        retrain.main(search_args(tiny_data, tmp_path / "r", "--genotype", ",".join(TABLE1), "--backbone", "resnet18"))


# ---------------------------------------------------------------------------------------------------
# bench.py: the memory measurement itself (no timing assertions)

def test_bench_memory_grows_with_k_and_recompute_is_flat():
    import bench
    x, y = bench.batch(4, "cpu")
    mem = {k: bench.activation_bytes(bench.search_net(k), x, y) for k in (1, 2, 4)}
    assert mem[1] < mem[2] < mem[4]
    assert abs((mem[4] - mem[2]) - 2 * (mem[2] - mem[1])) < 0.05 * (mem[2] - mem[1])  # linear in k
    darts = bench.activation_bytes(bench.search_net(16, "darts"), x, y)
    assert mem[2] < darts
    flat = [bench.activation_bytes(bench.search_net(k, recompute=True), x, y) for k in (1, 4)]
    assert flat[1] <= 1.2 * flat[0]
    # and the hand-written candidates keep no more than torch's fused ones
    xs = torch.randn(4, 32, 8, 8, requires_grad=True)
    for op in ("BN+GELU", "GN+Mish", "LN+Swish", "IN+ReLU"):
        hand = ns.saved_tensor_bytes(lambda: ns.NormAct(op, 32)(xs))[1]
        fused = ns.saved_tensor_bytes(lambda: bench.TorchNormAct(op, 32)(xs))[1]
        assert hand <= 1.02 * fused, op  # the same full-size tensors; a few bytes of statistics differ


# ---------------------------------------------------------------------------------------------------
# export_coreml.py

def test_export_coreml_package(tmp_path):
    ct = pytest.importorskip("coremltools", reason="coremltools is not installed (optional; .ci/run installs it)")
    import export_coreml
    torch.manual_seed(0)
    net = ns.Network(TABLE1, num_classes=10, widths=(8, 16, 16))
    net.train()
    net(torch.randn(8, 3, 32, 32))  # non-trivial BN running statistics
    classes = [f"c{i}" for i in range(10)]
    retrain.save_model(str(tmp_path / "model.pt"), net.eval(), "cells", "cifar10", classes,
                       [0.5, 0.4, 0.3], [0.25, 0.24, 0.26], 0.4321)
    out = str(tmp_path / "m.mlpackage")
    export_coreml.main([str(tmp_path / "model.pt"), "--out", out])
    spec = ct.models.MLModel(out, skip_model_load=True).get_spec()
    (inp,) = spec.description.input
    assert inp.name == "image" and inp.type.WhichOneof("Type") == "imageType"
    assert (inp.type.imageType.width, inp.type.imageType.height) == (32, 32)
    assert inp.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.description.predictedFeatureName == "classLabel"
    assert {o.name for o in spec.description.output} == {"classLabel", "classLabel_probs"}
    ops = [op for block in spec.mlProgram.functions["main"].block_specializations.values()
           for op in block.operations]
    (classify,) = [op for op in ops if op.type == "classify"]
    labels = [v.immediateValue.tensor.strings.values[0]
              for v in classify.inputs["classes"].arguments[0].value.immediateValue.list.values]
    assert labels == classes
    meta = spec.description.metadata.userDefined
    assert meta["genotype"] == ",".join(TABLE1) and meta["test_accuracy"] == "43.21"
    assert meta["parameters"] == str(sum(p.numel() for p in net.parameters())) and meta["widths"] == "8,16,16"


def test_readme_equation_map_points_at_real_names():
    text = open(os.path.join(HERE, "README.md")).read()
    table = text.split("## The paper in the code")[1].split("\n## ")[0]
    names = [n for n in re.findall(r"`([A-Za-z_][\w.]*)(?:\(|`)", table) if n != "nasearch.py"]
    assert len(names) > 20
    for name in names:
        obj = ns
        for part in name.split("."):
            assert hasattr(obj, part), name
            obj = getattr(obj, part)
    for eq in ("eq 1", "eq 2", "eq 3", "eq 4", "eq 5"):
        assert eq in table
