"""Train the builtin ``flux-fmnist`` reference model (class-conditional rectified flow on Fashion-MNIST).

    python tools/train_flux_fmnist.py --compile --out models/flux-fmnist              # GPU: bf16 autocast, 15k steps
    python tools/train_flux_fmnist.py --steps 50 --batch 32 --out /tmp/smoke          # CPU smoke run

Rectified flow (SD3/Flux): x_s = (1 - s) x0 + s eps with s ~ logit-normal(0, 1), the transformer
predicts v = eps - x0 (MSE). The class is dropped to the null class with probability 0.1 for
classifier-free guidance. Constant learning rate after a linear warm-up, so a checkpoint saved at
step k equals a run with ``--steps k``. EMA weights are what is shipped.

Reproducibility: the seed fixes the initialisation, the data order, the noise and the class
dropout; on the CPU a run is bit-for-bit repeatable; on a GPU, bf16 kernels and atomics make it
repeatable to rounding, not bit-for-bit.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without install
try:
    from adatsq.frontend.reference import FluxFMNIST, save_reference
    from adatsq.frontend.schedule import default_schedule
    from adatsq.tools import fmnist
except ImportError:  # checkout not named adatsq: import the package from the repository root
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("adatsq", root / "__init__.py", submodule_search_locations=[str(root)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["adatsq"] = mod
    spec.loader.exec_module(mod)
    from adatsq.frontend.reference import FluxFMNIST, save_reference
    from adatsq.frontend.schedule import default_schedule
    from adatsq.tools import fmnist


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=15000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--ema", type=float, default=0.9995)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step's model")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="GPU math: bf16 autocast, or fp32 with TF32 matmuls (CPU runs are always fp32)")
    p.add_argument("--save-every", type=int, default=0,
                   help="also save the EMA weights every N steps to OUT-latest (overwritten; removed at the end)")
    p.add_argument("--guidance", type=float, default=2.0, help="default guidance written into the model card")
    p.add_argument("--data", help="Fashion-MNIST idx folder (default: Debian's /usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    images, labels = fmnist.load("train", args.data)
    x_all = torch.from_numpy(fmnist.to_model_space(images)).to(dev)
    y_all = torch.from_numpy(labels).to(dev)
    n = len(x_all)

    model = FluxFMNIST.new(seed=args.seed).to(dev).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.transformer.parameters())
    print(f"flux-fmnist: {params / 1e6:.2f}M transformer parameters, {n} images, device {dev}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    fwd = torch.compile(model) if args.compile else model
    use_bf16 = dev.type == "cuda" and args.precision == "bf16"
    if dev.type == "cuda":
        # torch 2.11 + cu130 on H100: the cuDNN SDPA backend fails on these shapes in bf16
        # ("mha_graph.execute ... is_good()" and then CUBLAS_STATUS_EXECUTION_FAILED); use flash/efficient.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if dev.type == "cuda" and args.precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    null = model.conditioner.null_class

    def save(step: int, folder: Path) -> None:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        info = dict(training=dict(steps=step, precision=args.precision if dev.type == "cuda" else "fp32",
                                  compiled=args.compile, batch=args.batch, lr=args.lr, warmup=args.warmup, ema=args.ema,
                                  p_uncond=args.p_uncond, seed=args.seed, device=str(dev),
                                  gpu=torch.cuda.get_device_name() if dev.type == "cuda" else None,
                                  torch=torch.__version__, seconds=round(time.time() - t0, 1),
                                  final_loss=round(loss_avg, 5), command=" ".join(sys.argv)),
                    transformer_params=params)
        schedule = default_schedule("FluxTransformer2DModel", 20, args.guidance)
        save_reference(tmp, copy.deepcopy(ema).float().cpu(), schedule, info)
        json.dump(info, open(tmp / "training.json", "w"), indent=1)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        print(f"saved EMA weights at step {step} to {folder}", flush=True)

    latest = Path(args.out).with_name(Path(args.out).name + "-latest")
    t0, loss_avg, perm, pos = time.time(), float("nan"), None, n
    last = (0, t0)  # (step, time) of the last progress line: it/s is over the last window
    for step in range(1, args.steps + 1):
        if pos + args.batch > n:
            perm, pos = torch.randperm(n, generator=gen).to(dev), 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        x0, y = x_all[idx], y_all[idx].clone()
        drop = torch.rand(len(y), generator=gen).to(dev) < args.p_uncond
        y[drop] = null
        s = torch.sigmoid(torch.randn(len(y), generator=gen)).to(dev)
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
        lr = args.lr * min(1.0, step / max(1, args.warmup))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            v = fwd(xs, s, y)
        loss = F.mse_loss(v.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - args.ema)
        li = loss.item() if step % 50 == 0 or step == 1 else None
        if li is not None:
            loss_avg = li if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * li
        if step % 500 == 0 or step == 1:
            now = time.time()
            rate = (step - last[0]) / max(now - last[1], 1e-9)
            last = (step, now)
            print(f"step {step}/{args.steps} loss {loss_avg:.4f} lr {lr:.2e} {rate:.1f} it/s "
                  f"elapsed {now - t0:.0f}s", flush=True)
        if args.save_every and step % args.save_every == 0 and step != args.steps:
            save(step, latest)  # overwritten: the last one survives an interrupted run
    save(args.steps, Path(args.out))
    shutil.rmtree(latest, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
