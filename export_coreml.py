"""Export a model saved by retrain.py to Core ML (.mlpackage, ML Program) for on-device latency (Fig 9).

    pip install coremltools          # optional, not in requirements.txt
    python export_coreml.py runs/retrain-.../model.pt --out NASearch.mlpackage

The package takes a 32x32 RGB image (Core ML ImageType) and classifies it (ClassifierConfig with the
dataset's class names). The training normalization is applied for the app: ImageType's scale and bias
do x / 255 - mean per channel; ImageType has a single scale for all channels, so the per-channel
1 / std is the first op of the graph. Metadata: genotype, widths, recorded test accuracy, parameters.
Before converting, a traced copy is checked against eager PyTorch on random inputs; on macOS the
Core ML prediction is also compared with PyTorch on a few images (elsewhere Core ML cannot predict).
"""
import argparse
import os
import platform
import sys

import torch
import torch.nn as nn

import nasearch as ns


class ImageClassifier(nn.Module):
    """x in [0, 1] minus mean (done by ImageType) -> divided by std -> net -> softmax probabilities."""

    def __init__(self, net, std):
        super().__init__()
        self.net = net
        self.register_buffer("inv_std", 1 / torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return torch.softmax(self.net(x * self.inv_std), dim=1)


def load_model(path):
    """Rebuild the derived net from retrain.py's model.pt (weights_only: no code runs from the file)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    net = ns.build_model(saved["backbone"], saved["genotype"], saved["num_classes"], saved["widths"])
    net.load_state_dict(saved["state_dict"])
    return net.eval(), saved


def export(model_path, out, check_inputs=8):
    try:
        import coremltools as ct
    except ImportError:
        raise SystemExit("error: coremltools is not installed: pip install coremltools") from None
    net, saved = load_model(model_path)
    model = ImageClassifier(net, saved["std"]).eval()
    example = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
        x = torch.rand(check_inputs, 3, 32, 32)
        for i in range(check_inputs):  # traced at batch 1, checked on several inputs
            err = (traced(x[i:i + 1]) - model(x[i:i + 1])).abs().max().item()
            if err > 1e-5:
                raise SystemExit(f"error: the traced model differs from eager PyTorch by {err:.2e}")
    mean = saved["mean"]
    image = ct.ImageType(name="image", shape=(1, 3, 32, 32), color_layout=ct.colorlayout.RGB,
                         scale=1 / 255, bias=[-m for m in mean])
    mlmodel = ct.convert(traced, inputs=[image], classifier_config=ct.ClassifierConfig(list(saved["classes"])),
                         convert_to="mlprogram", minimum_deployment_target=ct.target.iOS15)
    geno = ",".join(saved["genotype"])
    mlmodel.short_description = f"NA-Search {saved['backbone']} net ({saved['dataset']}): {geno}"
    mlmodel.user_defined_metadata.update({
        "genotype": geno, "backbone": saved["backbone"], "widths": ",".join(map(str, saved["widths"])),
        "test_accuracy": f"{100 * saved['test_acc']:.2f}", "parameters": str(saved["params"]),
        "dataset": saved["dataset"], "mean": ",".join(f"{m:.6f}" for m in mean),
        "std": ",".join(f"{s:.6f}" for s in saved["std"])})
    mlmodel.save(out)
    print(f"saved {out}: {saved['params']:,} parameters, test accuracy {100 * saved['test_acc']:.2f}%")
    if platform.system() == "Darwin":
        compare_on_macos(mlmodel, model, mean)
    else:
        print(f"Core ML vs PyTorch comparison skipped: Core ML predicts only on macOS (this is {platform.system()})")
    return out


def compare_on_macos(mlmodel, model, mean, n=4):
    from PIL import Image
    worst = 0.0
    for seed in range(n):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
        probs = mlmodel.predict({"image": Image.fromarray(pixels.numpy())})
        key = next(k for k, v in probs.items() if isinstance(v, dict))
        x = (pixels.permute(2, 0, 1).float()[None] / 255 - torch.tensor(mean).view(1, 3, 1, 1))
        with torch.no_grad():
            ref = model(x)[0]
        worst = max(worst, max(abs(probs[key][c] - float(p)) for c, p in zip(probs[key], ref)))
    print(f"Core ML vs PyTorch on {n} images: max probability difference {worst:.2e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model.pt written by retrain.py")
    p.add_argument("--out", default=None, help="the .mlpackage to write [beside MODEL: NASearch.mlpackage]")
    args = p.parse_args(argv)
    if not os.path.isfile(args.model):
        raise SystemExit(f"error: {args.model}: no such file")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.model)), "NASearch.mlpackage")
    if not out.endswith(".mlpackage"):
        raise SystemExit("error: --out must end in .mlpackage")
    return export(args.model, out)


if __name__ == "__main__":
    sys.exit(main() and 0)
