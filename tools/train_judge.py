"""Train the Fashion-MNIST judge (:class:`adatsq.tools.judge.JudgeCNN`) on CPU and write it out.

    python tools/train_judge.py [--epochs N] [--seed S] [--out DIR] [--threads T]

Trains on the 60k training split (random shifts of up to +-2 px as augmentation: each image is zero-padded
to 32x32 and a random 28x28 crop is taken), AdamW with a one-cycle learning-rate schedule, cross-entropy.
Then evaluates on the training split (no augmentation) and the 10k test split, and writes, each file
atomically, into ``DIR`` (default ``adatsq/models/judge-fmnist``):

    judge.safetensors          the state dict (float32 weights, BatchNorm statistics)
    fid_reference.safetensors  mu [128], sigma [128, 128] (float64; mean and ddof=1 covariance of the
                               judge features of the test split) and count [1] (int64)
    judge.json                 arch, feature_dim, accuracies, seed, epochs, hyper-parameters, command,
                               cpu, train_seconds, per-epoch history

Deterministic for a given seed, thread count and torch build: ``torch.manual_seed``,
``torch.use_deterministic_algorithms(True)``, one seeded ``torch.Generator`` for shuffling and shifts,
no data-loader workers (all data handling happens in this process on preloaded tensors).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from adatsq.tools import fmnist
from adatsq.tools.io import atomic_path, atomic_write_text
from adatsq.tools.judge import (BATCH_SIZE, FEATURE_DIM, INFO_FILE, MEAN, REFERENCE_FILE, STD, WEIGHTS_FILE,
                                JudgeCNN, default_folder, to_input)
from adatsq.tools.metrics import feature_stats
from adatsq.tools.sysinfo import cpu_name

SHIFT = 2  # maximal random shift in pixels (augmentation)
MIN_STEPS = 8  # fewest optimizer steps a run may have


def random_shift(padded: torch.Tensor, gen: torch.Generator, shift: int = SHIFT) -> torch.Tensor:
    """Random crops ``[B, 28, 28]`` of images zero-padded by ``shift`` px (``[B, 28+2s, 28+2s]``): a
    uniform random shift in ``[-shift, shift]`` along each axis, independently per image."""
    b, size = padded.shape[0], padded.shape[1] - 2 * shift
    dy = torch.randint(0, 2 * shift + 1, (b, 1, 1), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (b, 1, 1), generator=gen)
    ar = torch.arange(size)
    rows = (dy + ar.view(1, size, 1)).expand(b, size, size)
    cols = (dx + ar.view(1, 1, size)).expand(b, size, size)
    return padded[torch.arange(b).view(b, 1, 1), rows, cols]


def evaluate(model: JudgeCNN, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, np.ndarray]:
    """(accuracy, features float64 [N, 128]) of ``model`` in eval mode on uint8 ``images [N, 28, 28]``."""
    model.eval()
    correct, feats = 0, []
    with torch.inference_mode():
        for start in range(0, len(images), BATCH_SIZE):
            f = model.features(to_input(images[start:start + BATCH_SIZE]))
            correct += int((model.head(f).argmax(1) == labels[start:start + BATCH_SIZE]).sum())
            feats.append(f)
    return correct / len(images), torch.cat(feats).numpy().astype(np.float64)


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)

    x_np, y_np = fmnist.load("train")
    xt_np, yt_np = fmnist.load("test")
    if args.train_limit:
        x_np, y_np = x_np[:args.train_limit], y_np[:args.train_limit]
    x = torch.from_numpy(x_np.copy())
    y = torch.from_numpy(y_np.copy())
    padded = F.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT))  # uint8, zero (black) background
    n = len(x)
    steps_per_epoch = (n + args.batch_size - 1) // args.batch_size
    if args.epochs * steps_per_epoch < MIN_STEPS:  # OneCycleLR's phases degenerate below that
        raise SystemExit(f"train_judge: {args.epochs} epoch(s) of {n} images in batches of {args.batch_size} "
                         f"make {args.epochs * steps_per_epoch} optimizer steps; at least {MIN_STEPS} needed")

    model = JudgeCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=0.25)
    history = []
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        for start in range(0, n, args.batch_size):
            idx = perm[start:start + args.batch_size]
            xb = random_shift(padded[idx], gen) if SHIFT else x[idx]
            logits = model(to_input(xb))
            loss = F.cross_entropy(logits, y[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        elapsed = time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "loss": round(loss_sum / n, 5),
                        "train_accuracy_augmented": round(correct / n, 5), "seconds": round(elapsed, 1)})
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / n:.4f}, augmented train accuracy "
              f"{correct / n:.4f}, {elapsed:.0f} s", flush=True)
    train_seconds = time.perf_counter() - t0

    train_acc, _ = evaluate(model, x, y)
    test_acc, test_feats = evaluate(model, torch.from_numpy(xt_np.copy()), torch.from_numpy(yt_np.copy()))
    print(f"train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f}, training {train_seconds:.0f} s",
          flush=True)
    mu, sigma = feature_stats(test_feats)

    info = {
        "arch": "JudgeCNN",
        "feature_dim": FEATURE_DIM,
        "num_classes": 10,
        "classes": list(fmnist.CLASSES),
        "parameters": sum(p.numel() for p in model.parameters()),
        "input": {"layout": "uint8 [N, 28, 28] -> (u / 255 - mean) / std, [N, 1, 28, 28]",
                  "mean": MEAN, "std": STD},
        "features": "penultimate activations: linear(1152->128) -> BatchNorm1d -> ReLU (input of the head)",
        "test_accuracy": round(test_acc, 5),
        "train_accuracy": round(train_acc, 5),
        "train_images": n,
        "test_images": len(xt_np),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": {"name": "AdamW", "max_lr": args.lr, "weight_decay": args.weight_decay,
                      "schedule": "OneCycleLR(pct_start=0.25)", "label_smoothing": args.label_smoothing},
        "augmentation": f"random shift of up to +-{SHIFT} px (zero padding)",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "cpu": cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "train_seconds": round(train_seconds, 1),
        "history": history,
        "fid_reference": {"file": REFERENCE_FILE, "split": "test", "count": len(xt_np), "covariance": "ddof=1"},
    }
    write_outputs(Path(args.out), model, mu, sigma, len(xt_np), info)
    return info


def write_outputs(out: Path, model: JudgeCNN, mu: np.ndarray, sigma: np.ndarray, count: int, info: dict) -> None:
    """Write the three files atomically (the JSON last, so that a complete JSON means complete weights)."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"arch": "JudgeCNN", "feature_dim": str(FEATURE_DIM)}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        tmp.write_bytes(save(state, metadata=meta))  # into atomic_path's file, keeping its permissions
    ref = {"mu": torch.from_numpy(np.ascontiguousarray(mu, dtype=np.float64)),
           "sigma": torch.from_numpy(np.ascontiguousarray(sigma, dtype=np.float64)),
           "count": torch.tensor([count], dtype=torch.int64)}
    with atomic_path(out / REFERENCE_FILE) as tmp:
        tmp.write_bytes(save(ref, metadata={"split": "fashion-mnist test", "covariance": "ddof=1"}))
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(default_folder()), help="output folder (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--train-limit", type=int, default=0, help="train on the first N images only (smoke tests)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.threads < 1 or args.train_limit < 0:
        p.error("--epochs, --batch-size and --threads must be >= 1, --train-limit >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
