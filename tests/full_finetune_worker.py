"""One rank of the FSDP2 full fine-tuning tests (torchrun's env contract); plain torch, no ComfyUI.

    python tests/full_finetune_worker.py OUT.pt STEPS GLOBAL_BATCH CHECKPOINT_DIR [RESUME]
Rank 0 writes {"weights": full trained weights and EMA, "losses": [...], "sharded": bool} to OUT.pt.
"""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dopsd_core import distributed, full_finetune  # noqa: E402
from dopsd_core.train import TrainConfig  # noqa: E402

DIM, CTX = 16, 8


class TinyDiT(nn.Module):
    def __init__(self, hidden=32, depth=3):
        super().__init__()
        self.inp = nn.Linear(DIM + 1 + CTX, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU())
                                    for _ in range(depth))
        self.out = nn.Linear(hidden, DIM)

    def forward(self, x, sigma, ctx):
        h = self.inp(torch.cat([x, sigma[:, None], ctx.expand(x.shape[0], -1)], 1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class Task:
    def __init__(self, model, net, n=4):
        gen = torch.Generator().manual_seed(1)
        self.model, self.net = model, net
        self.x0 = [torch.randn(1, DIM, generator=gen) for _ in range(n)]
        self.ctx = [torch.randn(1, CTX, generator=gen) for _ in range(n)]

    def __len__(self):
        return len(self.x0)

    def run(self, index, compute):
        ctx = self.ctx[index]

        def student(x, s):
            return self.model(x, s, ctx)

        def teacher(x, s):
            with self.net.mode("teacher"):
                return self.model(x, s, ctx + self.x0[index][:, :CTX])  # the teacher sees the target

        return compute(student, teacher, self.x0[index])


def main(out, steps, global_batch, ckpt_dir, resume=None):
    torch.set_num_threads(1)
    env = distributed.init_from_env(backend="gloo", timeout_s=60)
    torch.manual_seed(0)
    model = TinyDiT()
    if env.world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        full_finetune.shard_blocks(model, model.blocks, init_device_mesh("cpu", (env.world_size,)))
    net = full_finetune.FullWeights(model, ema_decay=0.9)
    cfg = TrainConfig(method="dopsd", steps=int(steps), batch_size=int(global_batch),
                      rollout_sigmas=(1.0, 0.75, 0.5, 0.25), loss_space="x0", lr=1e-2, seed=0, save_every=2)
    trainer = distributed.DistributedTrainer(net, Task(model, net), cfg, env, example_shape=lambda i: (1, DIM),
                                             checkpoint_dir=ckpt_dir)
    if resume:
        trainer.resume(resume)
    trainer.train()
    weights = net.state_dict()  # collective
    if env.is_main:
        torch.save({"weights": weights, "losses": trainer.losses, "sharded": net.sharded}, out)
    distributed.barrier(env)
    distributed.shutdown(env)
    sys.stdout.flush()
    os._exit(0)  # as the launcher: no interpreter teardown of c10d threads


if __name__ == "__main__":
    main(*sys.argv[1:])
