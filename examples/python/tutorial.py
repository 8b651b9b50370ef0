"""PyTorch's "Optional: Data Parallelism" tutorial, run with torch_dp.

The model prints the size of the chunk each replica receives; the loop prints the size of the whole batch.
With 30 rows per batch and 100 rows in all, the replicas see torch.chunk's split of each batch: on 4 replicas
8, 8, 8 and 6 rows, and 3, 3, 3 and 1 for the last batch of 10.

    python examples/python/tutorial.py                      # every GPU, else 4 CPU replicas
    python examples/python/tutorial.py --device cpu --replicas 8
"""

import argparse

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import torch_dp

# Parameters and DataLoaders
input_size = 5
output_size = 2
batch_size = 30
data_size = 100


class RandomDataset(Dataset):
    def __init__(self, size, length):
        self.len = length
        self.data = torch.randn(length, size)

    def __getitem__(self, index):
        return self.data[index]

    def __len__(self):
        return self.len


class Model(nn.Module):
    # Our model

    def __init__(self, input_size, output_size):
        super().__init__()
        self.fc = nn.Linear(input_size, output_size)

    def forward(self, input):
        output = self.fc(input)
        # One write per line: the replicas print from several threads at once.
        print(f"\tIn Model: input size {input.size()} output size {output.size()}\n", end="", flush=True)
        return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="where the replicas run (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--replicas", type=int, default=None, help="number of replicas (default: every GPU, or 4 on the CPU)"
    )
    args = parser.parse_args()
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device, and none is available")
    if args.replicas is not None and args.replicas < 1:
        parser.error("--replicas must be at least 1")
    if device_type == "cuda":
        count = args.replicas or torch.cuda.device_count()
        # More replicas than GPUs: repeat the GPUs (several replicas per device work, as upstream).
        device_ids = [i % torch.cuda.device_count() for i in range(count)]
        device = torch.device("cuda", 0)
        print(f"Let's use {count} replicas on {torch.cuda.device_count()} GPUs!")
    else:
        count = args.replicas or 4
        device_ids = ["cpu"] * count
        device = torch.device("cpu")
        print(f"Let's use {count} CPU replicas!")

    torch.manual_seed(0)
    rand_loader = DataLoader(dataset=RandomDataset(input_size, data_size), batch_size=batch_size, shuffle=True)

    model = Model(input_size, output_size)
    model.to(device)
    model = torch_dp.DataParallel(model, device_ids=device_ids)

    for data in rand_loader:
        input = data.to(device)
        output = model(input)
        print("Outside: input size", input.size(), "output_size", output.size())


if __name__ == "__main__":
    main()
