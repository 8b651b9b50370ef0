"""torch_dp inside torch.distributed: DistributedDataParallel across processes, torch_dp.DataParallel inside each.

Each process (one per node, or a few per node on a machine with many GPUs) takes its share of the data through a
DistributedSampler and splits its batch again over its own devices with torch_dp. DDP sees one module per
process and averages the gradients of the processes; torch_dp has already summed the gradients of its replicas
into the module's own parameters, so the composition trains like one large batch.

    torchrun --standalone --nproc-per-node 2 examples/python/ddp.py                 # 2 processes x 2 CPU replicas
    torchrun --standalone --nproc-per-node 2 examples/python/ddp.py --replicas 3
    torchrun --nnodes 4 --nproc-per-node 1 --rdzv-endpoint HOST:29500 examples/python/ddp.py   # every GPU of a node

With GPUs, the processes of a node share its GPUs out evenly (4 GPUs, 2 processes: GPUs 0-1 and 2-3) and use
NCCL; --replicas N repeats a process's GPUs up to N replicas (one GPU, --replicas 2: device_ids [0, 0]).
Without GPUs, or with --device cpu, each process runs --replicas CPU replicas (default 2) over gloo. Rank 0
prints the mean loss of each epoch.
"""

import argparse
import gc
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before init_process_group: see the end of main)
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import torch_dp


def local_devices(use_cuda: bool, local_rank: int, local_world: int, replicas: Optional[int]) -> list:
    """The devices of this process: its share of the node's GPUs (repeated up to `replicas`), or CPU replicas."""
    if not use_cuda:
        return ["cpu"] * (replicas or 2)
    gpus = torch.cuda.device_count()
    if local_world > gpus:
        raise SystemExit(f"{local_world} processes on this node but only {gpus} GPUs: start at most {gpus}")
    per_process = gpus // local_world
    mine = list(range(local_rank * per_process, (local_rank + 1) * per_process))
    return [mine[i % len(mine)] for i in range(replicas or len(mine))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per process and step")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="where the replicas run (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="replicas per process (default: one per GPU of the process, or 2 on the CPU)",
    )
    args = parser.parse_args()
    use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if use_cuda and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device, and none is available")
    if "RANK" not in os.environ:
        parser.error("start this script with torchrun, e.g. torchrun --standalone --nproc-per-node 2 " + __file__)
    if (args.replicas is not None and args.replicas < 1) or args.epochs < 1 or args.batch_size < 1:
        parser.error("--replicas, --epochs and --batch-size must be at least 1")

    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    devices = local_devices(use_cuda, int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"]), args.replicas)
    device = torch.device("cuda", devices[0]) if use_cuda else torch.device("cpu")

    # The same synthetic regression problem on every rank: y = x @ w_true + noise.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=generator)
    y = x @ torch.randn(32, 4, generator=generator) + 0.01 * torch.randn(4096, 4, generator=generator)
    sampler = DistributedSampler(TensorDataset(x, y), shuffle=True, seed=0)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, sampler=sampler)

    torch.manual_seed(0)  # DDP broadcasts rank 0's weights anyway; this keeps runs repeatable
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.BatchNorm1d(128), nn.Linear(128, 4)).to(device)
    # torch_dp inside, DDP outside. DDP is given no device_ids: the module it wraps spans several devices.
    model = DistributedDataParallel(torch_dp.DataParallel(model, device_ids=devices))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if rank == 0:
        print(
            f"{dist.get_world_size()} processes x {len(devices)} replicas each "
            f"({'GPUs ' + str(devices) if device.type == 'cuda' else 'CPU'}), backend {dist.get_backend()}"
        )

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(2, device=device)  # sum of losses, number of steps
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad()
            loss = F.mse_loss(model(inputs), targets)
            loss.backward()
            optimizer.step()
            total += torch.stack([loss.detach(), torch.ones((), device=device)])
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch}: mean loss {(total[0] / total[1]).item():.6f}", flush=True)

    # Note [Shutting down gloo]
    # ~~~~~~~~~~~~~~~~~~~~~~~~~
    # The process group must be gone, its worker threads joined, before the interpreter finalizes. A gloo
    # worker thread releases each collective's work (and the tensors it holds, here `total`) after the caller
    # has been told it finished; a tensor Python has seen needs the GIL to be released, and a thread that asks
    # for the GIL once the interpreter is finalizing is ended by it, inside a destructor that may not throw:
    # "terminate called without an active exception", SIGABRT at exit, now and then, with plain DDP too.
    # destroy_process_group() joins those threads only if it drops the last reference to the group, so:
    #  - torch.distributed.nn is imported before init_process_group: DDP imports it otherwise (through
    #    torch.distributed._shard) once the group exists, and the `group=group.WORLD` defaults of its functions
    #    then hold the default group for good (torch 2.13);
    #  - DDP, which holds the group through its reducer, is collected first (its hooks form reference cycles).
    # The barrier keeps a rank from tearing down its connections while the other still uses them.
    dist.barrier()
    del model, optimizer
    gc.collect()
    dist.destroy_process_group()
    print(f"rank {rank}: process group destroyed", flush=True)


if __name__ == "__main__":
    main()
