"""Retrain a searched genotype from scratch and report the paper's Table 2/3 row.

    python retrain.py --genotype runs/search-.../genotype.json        # the paper: 200 epochs, all 50,000
    python retrain.py --genotype BN+ReLU                               # the fixed BN+ReLU baseline (Fig 6)
    python retrain.py --genotype BN+GELU,GN+GELU,...  --epochs 3       # a comma list, one op per cell

Tests every epoch; the result is the final epoch's top-1 (the best epoch is shown, labelled, but picking
it on the test set is not a fair number). At the end: top-1, parameters, inference latency (1 image and
a batch of 128) and peak training memory, printed and saved as result.json. The run folder (--out) also
holds config.json, log.jsonl, checkpoint.pt (every epoch, atomic) and model.pt (for export_coreml.py).
"""
import argparse
import copy
import json
import os
import time

import torch
import torch.nn.functional as F

import nasearch as ns
from search import Progress, check_finite, data_args, finish_args, load_data

ARTEFACTS = ("config.json", "log.jsonl", "checkpoint.pt", "model.pt", "result.json")


def parse_genotype(text, backbone, widths_given):
    """--genotype as a genotype.json path, a comma list, or one op for every site.
    Returns (ops, backbone, widths or None); one-line SystemExit on anything invalid."""
    info = {}
    if text.endswith(".json") or os.path.isfile(text):
        try:
            with open(text) as f:
                info = json.load(f)
            ops = info["genotype"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: --genotype {text}: not a readable genotype.json ({e})") from None
        saved = info.get("backbone", "cells")
        if backbone is not None and backbone != saved:
            raise SystemExit(f"error: {text} is a {saved} genotype, not {backbone}; use --backbone {saved}")
        backbone = saved
    else:
        ops = [op.strip() for op in text.split(",")]
    backbone = backbone or "cells"
    widths = None if widths_given or backbone != "cells" else info.get("widths")
    n = ns.num_sites(backbone, widths or (16, 32, 64))
    if len(ops) == 1 and not info:
        ops = ops * n
    try:
        ns.check_genotype(ops, n)
    except ValueError as e:
        raise SystemExit(f"error: --genotype: {e}") from None
    return ops, backbone, widths


def save_model(path, model, backbone, dataset, classes, mean, std, test_acc):
    """model.pt: everything export_coreml.py needs, loadable with torch.load(weights_only=True)."""
    widths = list(model.widths) if backbone == "cells" else []
    ns.save_atomic({"state_dict": model.state_dict(), "genotype": list(model.genotype), "backbone": backbone,
                    "widths": widths, "num_classes": model.num_classes, "classes": list(classes),
                    "mean": list(mean), "std": list(std), "test_acc": test_acc, "dataset": dataset,
                    "params": sum(p.numel() for p in model.parameters())}, path)


def peak_train_memory(model, optimizer, x, y, device):
    """Peak training memory in MB at this batch, measured on a copy (the trained model stays as it is).
    CUDA: the allocator's peak over one training step. CPU: parameters + gradients + Adam state + the
    input batch + the tensors autograd saves for backward (each storage once), i.e. what a step must
    hold at its peak, not the process's RSS."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=optimizer.defaults["lr"])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ns.train_step(model, x, y, optimizer)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    _, saved = ns.saved_tensor_bytes(lambda: F.cross_entropy(model(x), y))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    adam_state = 2 * params  # exp_avg and exp_avg_sq per parameter
    return (2 * params + adam_state + x.numel() * x.element_size() + saved) / 2 ** 20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genotype", required=True, help="genotype.json from search.py, a comma list of op names, "
                   "or one op name for every cell (BN+ReLU: the paper's fixed baseline)")
    data_args(p, "retrain")
    p.add_argument("--epochs", type=int, default=200, help="[%(default)s]")
    args = p.parse_args(argv)
    ops, args.backbone, saved_widths = parse_genotype(args.genotype, args.backbone, args.widths is not None)
    if saved_widths:
        args.widths = ",".join(map(str, saved_widths))
    args = finish_args(args, "retrain")
    if args.epochs < 1:
        raise SystemExit("error: --epochs must be at least 1")
    config = dict(vars(args), genotype_ops=ops)
    device = ns.pick_device(args.device)
    ckpt = ns.open_run(args.out, config, args.resume, args.overwrite, device, ARTEFACTS)

    d = load_data(args)
    num_classes = len(d["classes"])
    torch.manual_seed(args.seed)
    order = torch.Generator().manual_seed(args.seed)
    train = ns.Batches(d["train_x"].to(device), d["train_y"].to(device), args.batch_size, d["mean"], d["std"],
                       augment=args.augment, generator=order)
    test = ns.Batches(d["test_x"].to(device), d["test_y"].to(device), 500, d["mean"], d["std"], shuffle=False)
    model = ns.build_model(args.backbone, ops, num_classes, args.widths, seed=args.seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    history, start = [], 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        ns.set_rng_state(ckpt["rng"], order=order)
        history, start = ckpt["history"], ckpt["epoch"]
        print(f"resuming {args.out} after epoch {start}", flush=True)
    else:
        ns.write_atomic(os.path.join(args.out, "config.json"), json.dumps(config, indent=2) + "\n")
    params = sum(p.numel() for p in model.parameters())
    print(f"retrain: {args.backbone} {','.join(ops)}\n  {params:,} parameters, {len(train.x)} train / "
          f"{len(test.x)} test images, {args.epochs} epochs, device {device}, run folder {args.out}", flush=True)

    for epoch in range(start, args.epochs):
        model.train()
        t0, sums, seen, progress = time.time(), torch.zeros(2, device=device), 0, Progress(len(train))
        for step, (x, y) in enumerate(train, 1):
            loss, correct = ns.train_step(model, x, y, opt)
            sums += torch.stack([loss * len(y), correct])
            seen += len(y)
            if step % 20 == 0 or step == len(train):
                check_finite(progress, epoch, step, training=float(sums[0]))
                progress.update(step, float(sums[0]) / seen, seen)
        progress.done()
        test_loss, test_acc = ns.evaluate(model, test)
        row = {"epoch": epoch + 1, "train_loss": float(sums[0]) / seen, "train_acc": float(sums[1]) / seen,
               "test_loss": test_loss, "test_acc": test_acc, "seconds": time.time() - t0}
        history.append(row)
        ns.save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                        "rng": ns.rng_state(order=order), "history": history, "config": config},
                       os.path.join(args.out, "checkpoint.pt"))
        ns.write_atomic(os.path.join(args.out, "log.jsonl"), "".join(json.dumps(r) + "\n" for r in history))
        print(f"epoch {epoch + 1}/{args.epochs}  train {row['train_loss']:.3f} {100 * row['train_acc']:.2f}%  "
              f"test {test_loss:.3f} {100 * test_acc:.2f}%  {row['seconds']:.0f}s", flush=True)

    final, best = history[-1], max(history, key=lambda r: r["test_acc"])
    save_model(os.path.join(args.out, "model.pt"), model, args.backbone, args.dataset, d["classes"],
               d["mean"], d["std"], final["test_acc"])
    model.eval()
    with torch.no_grad():
        one = d["test_x"][:1].to(device).float()
        batch = d["test_x"][:128].to(device).float()
        lat1 = ns.median_ms(lambda: model(one), device=device)
        lat128 = ns.median_ms(lambda: model(batch), device=device)
    xb, yb = next(iter(train))
    memory = peak_train_memory(model, opt, xb, yb, device)
    result = {"genotype": ops, "backbone": args.backbone, "dataset": args.dataset, "epochs": args.epochs,
              "top1": 100 * final["test_acc"], "best_top1": 100 * best["test_acc"], "best_epoch": best["epoch"],
              "params_M": params / 1e6, "params": params, "latency_ms_batch1": lat1, "latency_ms_batch128": lat128,
              "peak_train_memory_MB": memory, "device": str(device),
              "memory_measure": "cuda allocator peak over one training step" if device.type == "cuda" else
              f"params + grads + Adam state + input + tensors saved for backward (one step, batch {len(yb)})"}
    ns.write_atomic(os.path.join(args.out, "result.json"), json.dumps(result, indent=2) + "\n")
    print(f"\nTable 2/3 row ({args.dataset}, {device}):\n"
          f"  {'Model':<10}{'Top-1 (%)':>10}{'Params (M)':>12}{'Latency 1 / 128 (ms)':>23}{'Peak train mem (MB)':>22}\n"
          f"  {'this':<10}{result['top1']:>10.2f}{result['params_M']:>12.3f}{lat1:>11.2f} / {lat128:<9.2f}{memory:>22.1f}\n"
          f"  final epoch {final['epoch']}: {result['top1']:.2f}%  (best epoch {best['epoch']}: "
          f"{result['best_top1']:.2f}%, chosen on the test set, not a fair number)\n"
          f"  memory: {result['memory_measure']}\n  saved: {os.path.join(args.out, 'result.json')}, "
          f"{os.path.join(args.out, 'model.pt')}")
    return result


if __name__ == "__main__":
    main()
