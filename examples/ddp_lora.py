"""LoRA under DistributedDataParallel: every rank trains on its part of the digits, rank 0 saves the adapter.

peftlite needs nothing of its own here: wrap the model first (wrap freezes the base, so DDP registers
only the adapters and the head for gradient reduction), then hand it to DDP. The adapters are whole on
every rank, so rank 0 alone saves ``ddp.module``. CPU and gloo; docs/distributed.md has the details.

    torchrun --nproc-per-node 2 examples/ddp_lora.py [--epochs 6] [--out ddp_adapter.safetensors]
"""

import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import peftlite
from peftlite.demo.digits import NEW_CLASSES, accuracy, digit_split, pretrained_backbone

parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
parser.add_argument("--epochs", type=int, default=6)
parser.add_argument("--out", default="ddp_adapter.safetensors", help="the adapter file rank 0 writes")
args = parser.parse_args()

dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
rank, world = dist.get_rank(), dist.get_world_size()

# Every rank builds the same model (same seed); DDP also broadcasts rank 0's parameters and buffers.
model = pretrained_backbone(seed=0, progress=False)
base = copy.deepcopy(model)  # to show the file loads into a fresh backbone
torch.manual_seed(0)
peftlite.wrap(model, nn.Conv2d, rank=4, heads={"fc": nn.Linear(model.fc.in_features, len(NEW_CLASSES))})
if rank == 0:
    print(peftlite.summary(model))
ddp = DistributedDataParallel(model)  # after wrap: only parameters that require grad are reduced

split = digit_split(NEW_CLASSES)
data = TensorDataset(split.x_train, split.y_train)
sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
loader = DataLoader(data, batch_size=32, sampler=sampler)  # 32 per rank: 64 per step in all
optimizer = torch.optim.AdamW(peftlite.param_groups(model, 1e-2))

for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    ddp.train()
    total = torch.zeros(2)  # summed loss, samples on this rank
    for x, y in loader:
        loss = F.cross_entropy(ddp(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the adapters' and the head's gradients over the ranks here
        optimizer.step()
        total += torch.tensor([loss.item() * len(y), len(y)])
    dist.all_reduce(total)
    if rank == 0:
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total[0] / total[1]:.3f}, "
              f"test accuracy {accuracy(model, split.x_test, split.y_test):.3f}")

if rank == 0:  # the adapters are the same on every rank: one rank writes, no collective
    peftlite.save(model, args.out)
    reloaded = peftlite.load(base, args.out)
    print(f"final accuracy on digits 5-9 ({world} ranks): {accuracy(model, split.x_test, split.y_test):.3f}; "
          f"{os.path.getsize(args.out) / 1024:.0f} KiB adapter in {args.out}, reloaded into a fresh backbone: "
          f"{accuracy(reloaded, split.x_test, split.y_test):.3f}")
dist.destroy_process_group()
