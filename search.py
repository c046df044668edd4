"""NA-Search on CIFAR: the paper's search protocol (eq 2, 4, 5), crash-safe and resumable.

    python search.py                                  # the paper: CIFAR-10, 50 epochs, k linear 2 -> 4
    python search.py --subset 5000 --epochs 3         # a quick try
    python search.py --out runs/s1 --resume           # continue a killed run where it stopped

Writes to the run folder (--out): config.json, log.jsonl (one JSON line per epoch: metrics, k, tau,
softmax(alpha) of every cell), genotype.json (for retrain.py), checkpoint.pt (every epoch, atomic) and
alpha.png (softmax(alpha) per cell, the chosen op boxed). Prints Table 1 at the end.
"""
import argparse
import io
import json
import math
import os
import sys
import time

import torch
from PIL import Image, ImageDraw, ImageFont

import nasearch as ns

ARTEFACTS = ("config.json", "log.jsonl", "genotype.json", "checkpoint.pt", "alpha.png", "table1.txt")


def data_args(p, out_prefix):
    """The flags search.py and retrain.py share."""
    p.add_argument("--data", default="data", help="folder with the extracted batches or the official .tar.gz "
                   "(downloaded there if missing) [%(default)s]")
    p.add_argument("--dataset", default="cifar10", choices=sorted(ns.CIFAR), help="[%(default)s]")
    p.add_argument("--subset", type=int, default=None, metavar="N", help="use only the first N training images")
    p.add_argument("--no-download", action="store_true", help="never download; fail if the data is missing")
    p.add_argument("--backbone", default=None, choices=ns.BACKBONES,
                   help="cells: the paper's 9-cell net (default); resnet18: ResNet-18, every norm+act searchable")
    p.add_argument("--widths", default=None, help="cell-net stage widths, e.g. 16,32,64 "
                   "[16,32,64 for cifar10, 32,64,128 for cifar100, as in the paper]")
    p.add_argument("--batch-size", type=int, default=128, help="[%(default)s]")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the weights [%(default)s]")
    p.add_argument("--augment", action="store_true", help="random crop + flip (the paper used none)")
    p.add_argument("--seed", type=int, default=0, help="[%(default)s]")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device [%(default)s]")
    p.add_argument("--out", default=None, help=f"run folder [runs/{out_prefix}-<date>-<time>]")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")


def finish_args(args, out_prefix):
    if args.resume and not args.out:
        raise SystemExit("error: --resume needs --out RUN_DIR")
    args.backbone = args.backbone or "cells"
    args.out = args.out or os.path.join("runs", time.strftime(f"{out_prefix}-%Y%m%d-%H%M%S"))
    if args.widths is None:
        args.widths = "32,64,128" if args.dataset == "cifar100" else "16,32,64"
    try:
        args.widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        raise SystemExit(f"error: --widths takes comma-separated integers, got {args.widths!r}") from None
    if args.subset is not None and args.subset < 2:
        raise SystemExit("error: --subset needs at least 2 images")
    return args


def load_data(args):
    """Training (first --subset) and test images as uint8 tensors, and the normalization statistics."""
    print(f"loading {args.dataset} from {os.path.abspath(args.data)}", flush=True)
    try:
        d = ns.load_cifar(args.data, args.dataset, download=not args.no_download)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.subset:
        d["train_x"], d["train_y"] = d["train_x"][:args.subset], d["train_y"][:args.subset]
    d["mean"], d["std"] = ns.channel_stats(d["train_x"])
    return d


class Progress:
    """A live line during an epoch: rewritten every 0.5 s on a terminal, a plain line a minute otherwise."""

    def __init__(self, total):
        self.total, self.t0, self.live = total, time.time(), sys.stdout.isatty()
        self.last = self.t0

    def update(self, step, loss, images):
        now = time.time()
        if now - self.last > (0.5 if self.live else 60) and step < self.total:
            self.last = now
            line = f"  step {step}/{self.total}  loss {loss:.3f}  {images / (now - self.t0):.0f} img/s"
            print(f"\r{line}   " if self.live else line, end="" if self.live else "\n", flush=True)

    def done(self):
        if self.live:
            print("\r" + " " * 70 + "\r", end="")


def check_finite(progress, epoch, step, **losses):
    """Stop in one line on a NaN or inf loss; the checkpoint of the last finished epoch stays intact."""
    for name, value in losses.items():
        if not math.isfinite(value):
            progress.done()
            raise SystemExit(f"error: the {name} loss became {value} in epoch {epoch + 1}, step {step}; stopped. "
                             f"The last good checkpoint (epoch {epoch}) is intact in the run folder; try a lower --lr.")


def draw_alpha(probs, geno, path):  # path: a file name or a binary file object
    """softmax(alpha) as a cells x 16 grid, darker = larger (sqrt scale, 1/16 light, 1 dark), the chosen
    (argmax) op of each cell boxed in red and named on the right."""
    font = ImageFont.load_default()
    cw, ch, left, top, right = 46, 24, 60, 44, 90
    img = Image.new("RGB", (left + cw * len(ns.OPS) + right, top + ch * len(probs) + 10), "white")
    d = ImageDraw.Draw(img)
    for j, op in enumerate(ns.OPS):
        norm, act = op.split("+")
        if j % len(ns.ACTIVATIONS) == 0:
            d.text((left + j * cw + 2, 6), norm, fill="black", font=font)
            d.line([(left + j * cw, 4), (left + j * cw, top + ch * len(probs))], fill="gray")
        d.text((left + j * cw + 4, 24), act, fill="black", font=font)
    for i, row in enumerate(probs):
        y = top + i * ch
        d.text((6, y + 6), f"cell {i + 1}", fill="black", font=font)
        best = max(range(len(row)), key=row.__getitem__)
        for j, p in enumerate(row):
            shade = int(255 * (1 - math.sqrt(min(max(p, 0.0), 1.0))))
            d.rectangle([left + j * cw + 1, y + 1, left + (j + 1) * cw - 1, y + ch - 1], fill=(shade, shade, 255))
            d.text((left + j * cw + 8, y + 6), f"{p:.3f}", fill="black" if shade > 110 else "white", font=font)
        bx = left + best * cw
        d.rectangle([bx, y, bx + cw, y + ch], outline="red", width=3)
        d.text((left + cw * len(ns.OPS) + 8, y + 6), geno[i], fill="black", font=font)
    img.save(path, format="PNG")


def table1(geno):
    lines = ["Cell Index  Selected Operation"] + [f"{i + 1:>10}  {op.replace('+', ' + ')}" for i, op in enumerate(geno)]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_args(p, "search")
    p.add_argument("--epochs", type=int, default=50, help="[%(default)s]")
    p.add_argument("--k", default="linear:2:4", help="candidates per cell and step: fixed:K, or linear:K0:K1 in "
                   "equal shares of the epochs (linear:4:2 decreases) [%(default)s]")
    p.add_argument("--tau-start", type=float, default=ns.TAU_START, help="tau at epoch 0 [%(default)s]")
    p.add_argument("--tau-decay", type=float, default=ns.TAU_DECAY,
                   help="tau = start * exp(-decay * epoch) (FBNet's schedule) [%(default)s]")
    p.add_argument("--mode", default="sample", choices=["sample", "darts"],
                   help="sample: eq 4 + 5 (NA-Search); darts: eq 1, all 16 candidates (baseline) [%(default)s]")
    p.add_argument("--recompute", action="store_true", help="recompute candidates in backward (less memory)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out for alpha (eq 2) [%(default)s]")
    p.add_argument("--arch-lr", type=float, default=3e-4, help="Adam learning rate of alpha [%(default)s]")
    p.add_argument("--arch-weight-decay", type=float, default=1e-3, help="[%(default)s]")
    args = finish_args(p.parse_args(argv), "search")
    try:
        ns.parse_k_schedule(args.k)
    except ValueError as e:
        raise SystemExit(f"error: --k: {e}") from None
    if args.epochs < 1:
        raise SystemExit("error: --epochs must be at least 1")
    config = dict(vars(args))
    device = ns.pick_device(args.device)
    ckpt = ns.open_run(args.out, config, args.resume, args.overwrite, device, ARTEFACTS)

    d = load_data(args)
    num_classes = len(d["classes"])
    torch.manual_seed(args.seed)
    train_idx, val_idx = ns.split_indices(len(d["train_x"]), args.val_fraction, args.seed)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise SystemExit("error: the train/validation split is empty; use more images or another --val-fraction")
    x, y = d["train_x"].to(device), d["train_y"].to(device)
    order = torch.Generator().manual_seed(args.seed)
    train = ns.Batches(x[train_idx.to(device)], y[train_idx.to(device)], args.batch_size, d["mean"], d["std"],
                       augment=args.augment, generator=order)
    val = ns.Batches(x[val_idx.to(device)], y[val_idx.to(device)], args.batch_size, d["mean"], d["std"],
                     generator=order)
    val_eval = ns.Batches(val.x, val.y, 500, d["mean"], d["std"], shuffle=False)

    model = ns.build_model(args.backbone, None, num_classes, args.widths, seed=args.seed).to(device)
    for m in ns.mixed_ops(model):
        m.mode, m.recompute = args.mode, args.recompute
    w_opt, a_opt = ns.make_optimizers(model, args.lr, args.arch_lr, arch_weight_decay=args.arch_weight_decay)
    history, start = [], 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        w_opt.load_state_dict(ckpt["weight_opt"])
        a_opt.load_state_dict(ckpt["arch_opt"])
        ns.set_rng_state(ckpt["rng"], gumbel=model.generator, order=order)
        history, start = ckpt["history"], ckpt["epoch"]
        print(f"resuming {args.out} after epoch {start}", flush=True)
    else:
        ns.write_atomic(os.path.join(args.out, "config.json"), json.dumps(config, indent=2) + "\n")
    print(f"search: {args.backbone} {num_classes} classes, widths {list(model.widths)}, {len(train.x)} train / "
          f"{len(val.x)} val images, {args.epochs} epochs, k {args.k}, mode {args.mode}, device {device}, "
          f"run folder {args.out}", flush=True)

    for epoch in range(start, args.epochs):
        k, tau = ns.k_at(args.k, epoch, args.epochs), ns.tau_at(epoch, args.tau_start, args.tau_decay)
        ns.set_schedule(model, k, tau)
        t0, sums, seen = time.time(), torch.zeros(4, device=device), 0
        progress, val_iter = Progress(len(train)), iter(val)
        for step, batch in enumerate(train, 1):
            vbatch = next(val_iter, None)
            if vbatch is None:  # the validation split is smaller: cycle it
                val_iter = iter(val)
                vbatch = next(val_iter)
            tl, tc, vl, vc = ns.bilevel_step(model, batch, vbatch, w_opt, a_opt)
            sums += torch.stack([tl * len(batch[1]), tc, vl * len(vbatch[1]), vc])
            seen += len(batch[1])
            if step % 20 == 0 or step == len(train):
                check_finite(progress, epoch, step, training=float(sums[0]), validation=float(sums[2]))
                progress.update(step, float(sums[0]) / seen, seen)
        progress.done()
        val_loss, val_acc = ns.evaluate(model, val_eval)
        if not math.isfinite(val_loss):
            raise SystemExit(f"error: the validation loss became {val_loss} in epoch {epoch + 1}; stopped. The "
                             f"last good checkpoint (epoch {epoch}) is intact in the run folder.")
        geno = ns.genotype(model)
        row = {"epoch": epoch + 1, "k": k, "tau": tau, "train_loss": float(sums[0]) / seen,
               "train_acc": float(sums[1]) / seen, "arch_loss": float(sums[2]) / seen,
               "val_loss": val_loss, "val_acc": val_acc, "seconds": time.time() - t0, "genotype": geno,
               "alpha_softmax": [torch.softmax(a.detach().float(), 0).tolist() for a in ns.arch_parameters(model)]}
        history.append(row)
        ns.save_atomic({"model": model.state_dict(), "weight_opt": w_opt.state_dict(), "arch_opt": a_opt.state_dict(),
                        "rng": ns.rng_state(gumbel=model.generator, order=order), "epoch": epoch + 1,
                        "history": history, "config": config}, os.path.join(args.out, "checkpoint.pt"))
        write_outputs(args, history, num_classes, list(model.widths))
        print(f"epoch {epoch + 1}/{args.epochs}  k {k}  tau {tau:.3f}  train {row['train_loss']:.3f} "
              f"{100 * row['train_acc']:.1f}%  val {val_loss:.3f} {100 * val_acc:.1f}%  {row['seconds']:.0f}s  "
              f"{','.join(geno)}", flush=True)

    geno = history[-1]["genotype"]
    print("\nTable 1: normalization-activation selected per cell\n" + table1(geno))
    print(f"\ngenotype: {os.path.join(args.out, 'genotype.json')}")
    return geno


def write_outputs(args, history, num_classes, widths):
    """The per-epoch artefacts, all rewritten from `history` so a resumed run's files match the checkpoint."""
    out, last = args.out, history[-1]
    ns.write_atomic(os.path.join(out, "log.jsonl"), "".join(json.dumps(r) + "\n" for r in history))
    ns.write_atomic(os.path.join(out, "genotype.json"), json.dumps({
        "genotype": last["genotype"], "backbone": args.backbone, "dataset": args.dataset,
        "num_classes": num_classes, "widths": widths, "epoch": last["epoch"], "k": args.k}, indent=2) + "\n")
    ns.write_atomic(os.path.join(out, "table1.txt"), table1(last["genotype"]) + "\n")
    png = io.BytesIO()
    draw_alpha(last["alpha_softmax"], last["genotype"], png)
    ns.write_atomic(os.path.join(out, "alpha.png"), png.getvalue())


if __name__ == "__main__":
    main()
