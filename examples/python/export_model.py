"""Exports a small model for deployment, the two ways LibTorch programs load models written in Python:

    model.pt    TorchScript (torch.jit.script(model).save): torch::jit::load, torch_dp::ScriptDataParallel
    model.pt2   an AOTInductor package (torch._inductor.aoti_compile_and_package over torch.export.export):
                torch::inductor::AOTIModelPackageLoader, torch_dp::PackageDataParallel
    input.pt, expected.pt   a batch and the model's output on it (torch.save; torch::pickle_load in C++)

The batch dimension is dynamic (torch.export.Dim), so the package runs on any batch size, and so on every chunk
torch_dp splits a batch into. Compiling the package takes about half a minute on two CPU cores.

    python examples/python/export_model.py exported/               # CPU package
    python examples/python/export_model.py exported/ --device cuda  # a package compiled for CUDA
    ./serve_exported exported/model.pt2 cpu cpu                     # examples/cpp/serve_exported.cpp
"""

import argparse
import os

import torch
from torch import nn

IN_FEATURES = 8
OUT_FEATURES = 4


class Model(nn.Module):
    """Linear(8, 16), ReLU, Linear(16, 4): a batch of rows in, a batch of rows out."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, 16)
        self.fc2 = nn.Linear(16, OUT_FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def export_package(model: nn.Module, example_inputs: tuple, path: str, dynamic_shapes=None) -> str:
    """Compiles `model` into an AOTInductor package at `path` (torch.export.export, then
    torch._inductor.aoti_compile_and_package) and returns the path."""
    exported = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
    return torch._inductor.aoti_compile_and_package(exported, package_path=path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="where model.pt, model.pt2, input.pt and expected.pt are written")
    parser.add_argument("--device", default="cpu", help="the device the package is compiled for (default: cpu)")
    parser.add_argument("--batch", type=int, default=10, help="rows in the batch written to input.pt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = Model().to(device).eval()
    os.makedirs(args.output_dir, exist_ok=True)

    torch.jit.script(model).save(os.path.join(args.output_dir, "model.pt"))

    # Dim's min=1: a chunk of one row is a batch like any other (torch.export would specialize a batch of 1).
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    example = torch.randn(args.batch, IN_FEATURES, device=device)
    with torch.no_grad():
        export_package(model, (example,), os.path.join(args.output_dir, "model.pt2"), ({0: batch},))
        expected = model(example)
    torch.save(example.cpu(), os.path.join(args.output_dir, "input.pt"))
    torch.save(expected.cpu(), os.path.join(args.output_dir, "expected.pt"))
    print(f"wrote model.pt, model.pt2, input.pt and expected.pt to {args.output_dir} (device {device})")


if __name__ == "__main__":
    main()
