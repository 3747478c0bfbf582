"""Tiny torch flow models for dopsd_core tests and benchmarks (no ComfyUI)."""
import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def single_thread():
    """Core tests run tiny models: one intra-op thread. On a shared 2-core machine two OpenMP threads
    wait on each other whenever a neighbour holds a core, which made a 20-step run 80x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyFlowModel(nn.Module):
    """v = f(x, sigma, context): an MLP over flattened x with sigma and a context vector mixed in."""

    def __init__(self, dim: int = 16, ctx_dim: int = 8, hidden: int = 64, depth: int = 2):
        super().__init__()
        self.inp = nn.Linear(dim + 1 + ctx_dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x, sigma, ctx):
        h = torch.cat([x, sigma[:, None].to(x.dtype), ctx.expand(x.shape[0], -1).to(x.dtype)], dim=1)
        h = torch.nn.functional.silu(self.inp(h))
        for blk in self.blocks:
            h = h + torch.nn.functional.silu(blk(h))
        return self.out(h)


class ListTask:
    """A TrainTask over fixed (x0, c_s, c_t) triples for one model + LoRANetwork."""

    def __init__(self, model, net, x0s, student_ctx, teacher_ctx):
        self.model, self.net = model, net
        self.x0s, self.cs, self.ct = x0s, student_ctx, teacher_ctx

    def __len__(self):
        return len(self.x0s)

    def run(self, index, compute):
        student, teacher = self.net.predictors(lambda x, s: self.model(x, s, self.cs[index]),
                                               lambda x, s: self.model(x, s, self.ct[index]))
        return compute(student, teacher, self.x0s[index])
