"""Measure NA-Search's cost claim (eq 5 costs O(k), eq 1 costs O(M)) and the hand-written ops.

    python bench.py                 # full run on the default device (a few minutes on 2 CPU cores)
    python bench.py --quick         # a small, fast version
    python bench.py --device cuda

Prints one table and saves it as JSON (--out). Three parts:
  1. search step of the 9-cell SearchNet at batch 128 (one bilevel step: a weight step and an alpha
     step, each forward + backward + Adam) for k = 1, 2, 3, 4, 8, 16 (eq 4 + 5), the DARTS relaxation
     (eq 1, all 16), and eq 5 with --recompute: median time, images/s (train + val images), and the
     activation memory of one forward (bytes autograd saves for backward, each storage once; on CUDA also
     the allocator's peak over the step), each as a ratio to the DARTS row.
  2. hand-written norm+activation vs torch's fused ops (F.batch_norm, F.instance_norm, F.group_norm with
     1 group = LN with per-channel affine, F.group_norm; F.relu, F.silu, F.gelu, F.mish), forward +
     backward at (128, 32, 16, 16): time and saved-memory ratios; and a derived-net train step with each.
  3. the derived net (Table 1 genotype): train step, inference latency at batch 1 and 128, and the share of
     a training step spent drawing and normalising a batch from the resident uint8 tensors.
"""
import argparse
import json
import os
import platform

import torch
import torch.nn.functional as F

import nasearch as ns

TABLE1 = ["BN+GELU", "GN+GELU", "GN+GELU", "LN+GELU", "BN+Swish", "BN+Swish", "BN+Swish", "BN+Swish", "GN+GELU"]
TORCH_NORMS = {
    "BN": lambda x, m: F.batch_norm(x, m.running_mean, m.running_var, m.gamma, m.beta, m.training, 0.1, ns.EPS),
    "IN": lambda x, m: F.instance_norm(x, weight=m.gamma, bias=m.beta, eps=ns.EPS),
    "LN": lambda x, m: F.group_norm(x, 1, m.gamma, m.beta, ns.EPS),
    "GN": lambda x, m: F.group_norm(x, ns.GN_GROUPS, m.gamma, m.beta, ns.EPS),
}
TORCH_ACTS = {"ReLU": F.relu, "Swish": F.silu, "GELU": F.gelu, "Mish": F.mish}


class TorchNormAct(ns.NormAct):
    """The same candidate computed with torch's fused ops: the reference the hand-written ones are held to."""

    def forward(self, x, residual=None, update_stats=True):
        y = TORCH_NORMS[self.norm](x, self)
        return TORCH_ACTS[self.act](y if residual is None else y + residual)


def with_torch_ops(model):
    for m in model.modules():
        if type(m) is ns.NormAct:
            m.__class__ = TorchNormAct
    return model


def search_net(k, mode="sample", recompute=False, device="cpu", seed=0):
    torch.manual_seed(seed)
    net = ns.SearchNet(seed=seed).to(device)
    ns.set_schedule(net, k, 1.0)
    for m in ns.mixed_ops(net):
        m.mode, m.recompute = mode, recompute
    return net


def batch(n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def activation_bytes(net, x, y):
    """Bytes autograd keeps for backward in one training forward of net (each storage once)."""
    net.train()
    _, nbytes = ns.saved_tensor_bytes(lambda: F.cross_entropy(net(x), y))
    return nbytes


def search_rows(device, bs, repeats):
    x, y = batch(bs, device)
    settings = [(f"eq 5, k={k}", k, "sample", False) for k in (1, 2, 3, 4, 8, 16)]
    settings += [("eq 1, DARTS (all 16)", 16, "darts", False)]
    settings += [(f"eq 5, k={k}, recompute", k, "sample", True) for k in (1, 2, 4)]
    rows = []
    for name, k, mode, recompute in settings:
        net = search_net(k, mode, recompute, device)
        w_opt, a_opt = ns.make_optimizers(net)
        step = lambda: ns.bilevel_step(net, (x, y), (x, y), w_opt, a_opt)  # noqa: E731
        ms = ns.median_ms(step, repeats, warmup=3, device=device)
        row = {"setting": name, "k": k, "mode": mode, "recompute": recompute, "step_ms": ms,
               "images_per_s": 2 * bs / (ms / 1e3), "activation_MB": activation_bytes(net, x, y) / 2 ** 20}
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row["cuda_peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        rows.append(row)
        print(f"  {name:<26} {ms:8.1f} ms", flush=True)
    darts = next(r for r in rows if r["mode"] == "darts")
    for r in rows:
        r["time_vs_darts"] = r["step_ms"] / darts["step_ms"]
        r["memory_vs_darts"] = r["activation_MB"] / darts["activation_MB"]
        if "cuda_peak_MB" in r:
            r["cuda_peak_vs_darts"] = r["cuda_peak_MB"] / darts["cuda_peak_MB"]
    return rows


def op_rows(device, shape, repeats):
    torch.manual_seed(0)
    x = torch.randn(*shape, device=device, requires_grad=True)
    g = torch.randn(*shape, device=device)
    rows = []
    for op in ns.OPS:
        hand = ns.NormAct(op, shape[1]).to(device)
        fused = TorchNormAct(op, shape[1]).to(device)
        r = {"op": op}
        for name, m in (("hand", hand), ("torch", fused)):
            r[f"{name}_ms"] = ns.median_ms(lambda: m(x).backward(g), repeats, device=device)
            _, r[f"{name}_saved_MB"] = ns.saved_tensor_bytes(lambda: m(x))
            r[f"{name}_saved_MB"] /= 2 ** 20
        r["time_ratio"], r["memory_ratio"] = r["hand_ms"] / r["torch_ms"], r["hand_saved_MB"] / r["torch_saved_MB"]
        rows.append(r)
    return rows


def derived_rows(device, bs, repeats):
    x, y = batch(bs, device)
    out = {}
    for name, make in (("hand", lambda: ns.Network(TABLE1)), ("torch", lambda: with_torch_ops(ns.Network(TABLE1)))):
        torch.manual_seed(0)
        net = make().to(device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        net.train()
        out[f"train_step_ms_{name}"] = ns.median_ms(lambda: ns.train_step(net, x, y, opt), repeats, device=device)
        out[f"activation_MB_{name}"] = activation_bytes(net, x, y) / 2 ** 20
        if name == "hand":
            net.eval()
            with torch.no_grad():
                x1 = x[:1]
                out["latency_ms_batch1"] = ns.median_ms(lambda: net(x1), 3 * repeats, device=device)
                out[f"latency_ms_batch{bs}"] = ns.median_ms(lambda: net(x), repeats, device=device)
    out["train_step_ratio_hand_vs_torch"] = out["train_step_ms_hand"] / out["train_step_ms_torch"]
    # the data path: draw a shuffled batch from resident uint8 images and normalise it
    images = torch.randint(0, 256, (50000, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (50000,), device=device)
    batches = ns.Batches(images, labels, bs, [0.5] * 3, [0.25] * 3)
    it = iter(batches)
    out["data_ms_per_batch"] = ns.median_ms(lambda: next(it), repeats, device=device)
    out["data_share_of_train_step"] = out["data_ms_per_batch"] / out["train_step_ms_hand"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) or a torch device [%(default)s]")
    p.add_argument("--quick", action="store_true", help="batch 16, few repeats: checks that it runs, not figures")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row [15, quick: 3]")
    p.add_argument("--out", default=None, help="JSON file [runs/bench-<device>.json]")
    args = p.parse_args(argv)
    device = ns.pick_device(args.device)
    bs = 16 if args.quick else 128
    repeats = args.repeats or (3 if args.quick else 15)
    shape = (bs, 32, 16, 16)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"bench on {device} ({machine}), batch {bs}, {repeats} repeats", flush=True)
    print("1. search steps", flush=True)
    search = search_rows(device, bs, repeats)
    print("2. hand-written vs torch ops", flush=True)
    ops = op_rows(device, shape, repeats)
    print("3. derived network", flush=True)
    derived = derived_rows(device, bs, repeats)
    result = {"device": str(device), "machine": machine, "batch": bs, "repeats": repeats, "search": search,
              "ops": ops, "derived": derived}
    print(format_table(result))
    out = args.out or os.path.join("runs", f"bench-{device.type}{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"saved {out}")
    return result


def format_table(r):
    bs = r["batch"]
    lines = [f"\n1. Search step, SearchNet, batch {bs} ({r['device']}: {r['machine']})",
             f"{'setting':<26}{'step ms':>9}{'img/s':>8}{'act. MB':>9}{'time/DARTS':>12}{'mem/DARTS':>11}"
             + ("  cuda peak MB" if "cuda_peak_MB" in r["search"][0] else "")]
    for s in r["search"]:
        lines.append(f"{s['setting']:<26}{s['step_ms']:>9.1f}{s['images_per_s']:>8.0f}{s['activation_MB']:>9.1f}"
                     f"{s['time_vs_darts']:>12.2f}{s['memory_vs_darts']:>11.3f}"
                     + (f"{s['cuda_peak_MB']:>15.1f}" if "cuda_peak_MB" in s else ""))
    plain = sorted((s["k"], s["activation_MB"]) for s in r["search"] if s["mode"] == "sample" and not s["recompute"])
    steps = [f"{(m1 - m0) / (k1 - k0):.1f}" for (k0, m0), (k1, m1) in zip(plain, plain[1:])]
    lines.append(f"activation MB per extra sampled candidate (k={plain[0][0]}..{plain[-1][0]}): {', '.join(steps)}")
    lines += [f"\n2. Hand-written vs torch fused, forward + backward at ({bs}, 32, 16, 16)",
              f"{'op':<10}{'hand ms':>9}{'torch ms':>10}{'time x':>8}{'hand MB':>9}{'torch MB':>10}{'mem x':>7}"]
    for o in r["ops"]:
        lines.append(f"{o['op']:<10}{o['hand_ms']:>9.2f}{o['torch_ms']:>10.2f}{o['time_ratio']:>8.2f}"
                     f"{o['hand_saved_MB']:>9.1f}{o['torch_saved_MB']:>10.1f}{o['memory_ratio']:>7.2f}")
    d = r["derived"]
    lines += [f"\n3. Derived net (Table 1 genotype), batch {bs}",
              f"train step: hand ops {d['train_step_ms_hand']:.1f} ms, torch ops {d['train_step_ms_torch']:.1f} ms "
              f"({d['train_step_ratio_hand_vs_torch']:.2f}x); activation memory {d['activation_MB_hand']:.1f} vs "
              f"{d['activation_MB_torch']:.1f} MB",
              f"inference latency: batch 1 {d['latency_ms_batch1']:.2f} ms, batch {bs} {d[f'latency_ms_batch{bs}']:.2f} ms",
              f"data path: {d['data_ms_per_batch']:.2f} ms per batch = {100 * d['data_share_of_train_step']:.1f}% "
              "of a train step"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
