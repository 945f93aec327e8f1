"""Spawned workers for tests/test_triangular.py (importable module)."""
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist

SHAPE = (3, 8, 8)


def sharded_equals_single(rank, world, port, out_dir):
    from deqir_dist import make_operator, restore
    from deqir_dist.models import GaussianMixtureDenoiser
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    model = GaussianMixtureDenoiser(seed=0)
    g = torch.Generator().manual_seed(3)
    op = make_operator("inpaint", SHAPE)
    y = op.A(model.sample(2, SHAPE, g))
    xi = torch.randn((2, *SHAPE), generator=g)
    kw = dict(steps=13, solver="parataa", m=3, noise=xi, dtype=torch.float64)
    single = restore(model, y, op, **kw)
    multi = restore(model, y, op, distributed=True, **kw)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"diff": float((multi.image - single.image).abs().max()), "k_single": single.iterations_per_image,
                   "k_multi": multi.iterations_per_image, "rows": list(multi.rank_rows)}, f)
    dist.destroy_process_group()
