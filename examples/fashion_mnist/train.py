"""Train the bundled example (a small RepVGG on Fashion-MNIST) and write its data files.

    python examples/fashion_mnist/train.py [--arch repvgg_nano] [--epochs 15] [--out DIR] [--device cpu|cuda]
        [--warmup-epochs E] [--batch N] [--lr LR] [--channels-last] [--stop-after N] [--train-images N]

Writes ``model.safetensors`` (multi-branch, unfused weights; arch/classes/input size in the file's
metadata), ``calib.npz`` (256 training images) and ``eval.npz`` (1000 test images, with labels).
Deterministic under ``--seed`` on the CPU (on CUDA, up to the GPU's float rounding); about 5 minutes on
an idle 2-core CPU (15 s per epoch).

After every epoch the full training state (weights, optimizer, schedule, random generators) goes to
``DIR/train_state.pt``; a later run with the same options resumes from it and ends with the same weights
as an uninterrupted run, so a multi-hour training can be split across sessions (``--stop-after``). The
state file is removed once ``model.safetensors`` is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import repapq_deploy.models  # noqa: F401  (registers repvgg_nano / mobileone_nano with timm)
from repapq_deploy.artifacts import atomic_path, save_torch
from repapq_deploy.data import fashion_mnist as fm


def channels_last_safe(device: str) -> bool:
    """Whether channels-last training is safe here. On CPUs without AVX-512 (an AMD EPYC with AVX2,
    torch 2.14.1 / oneDNN 3.12) the backward pass of a 1x1 conv on a channels-last batch of padded
    Fashion-MNIST crops never returned, and a contiguous batch into a channels-last model corrupted
    the heap; the contiguous format trains at the same speed there."""
    if device != "cpu" or torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return True
    print(f"--channels-last ignored: oneDNN's channels-last conv backward is unreliable on this CPU "
          f"({torch.backends.cpu.get_cpu_capability()}); training in the contiguous format", file=sys.stderr)
    return False


def train(arch: str, epochs: int, seed: int, batch: int = 128, size: int = 32,
          device: str = "cpu", warmup_epochs: float | None = None, lr: float = 2e-3,
          channels_last: bool = False, state_path: Path | None = None, stop_after: int | None = None,
          train_images: int | None = None) -> tuple[torch.nn.Module, float | None]:
    """Train ``arch`` on the Fashion-MNIST training set; return the model (on the CPU) and its test top-1 (%).

    The learning rate follows a one-cycle schedule whose warm-up takes 15 % of the run unless
    ``warmup_epochs`` says otherwise. ``channels_last`` trains in that memory format: about 2x faster
    for MobileOne's depthwise convs on the CPU, same maths up to float rounding order.

    With ``state_path`` the state after each epoch is saved there (atomically) and, if the file exists,
    training resumes from it; it must come from a run with the same settings. ``stop_after`` ends this
    call after that many new epochs; the returned accuracy is then None unless the run is complete.
    ``train_images`` trains on the first N images only (smoke runs).
    """
    settings = {"arch": arch, "epochs": epochs, "seed": seed, "batch": batch, "size": size,
                "warmup_epochs": warmup_epochs, "lr": lr, "train_images": train_images}
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    xtr, ytr = fm.load_raw("train")
    xte, yte = fm.load_raw("test")
    if train_images is not None:
        xtr, ytr = xtr[:train_images], ytr[:train_images]
    xtr_t = torch.from_numpy(fm.to_model_input(xtr, size)).to(device)
    ytr_t = torch.from_numpy(ytr).to(device)
    model = timm.create_model(arch, num_classes=10, in_chans=1).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * (len(xtr_t) // batch)
    # Deep plain stacks (MobileOne) barely move at the warm-up's starting rate (max_lr / 25), so a
    # long warm-up wastes their first epochs; --warmup-epochs shortens it.
    pct_start = 0.15 if warmup_epochs is None else min(warmup_epochs / epochs, 0.5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)
    pad = 2
    fill = float(xtr_t.min())  # the background (every image has zero borders): no device sync per step
    start, acc = 0, None
    if state_path is not None and state_path.exists():
        start, acc = _load_state(state_path, settings, model, opt, sched, rng)
        print(f"resuming {arch} from {state_path} after epoch {start}/{epochs}", file=sys.stderr, flush=True)
    end = epochs if stop_after is None else min(epochs, start + stop_after)
    for epoch in range(start, end):
        model.train()
        order = torch.from_numpy(rng.permutation(len(xtr_t)))
        t0, total = time.time(), torch.zeros((), device=device)
        for i in range(len(xtr_t) // batch):
            idx = order[i * batch:(i + 1) * batch].to(device)
            x = xtr_t[idx]
            # light augmentation: random shift by up to 2 px and horizontal flip
            x = F.pad(x, (pad,) * 4, value=fill)
            dx, dy = rng.integers(0, 2 * pad + 1, size=2)
            x = x[:, :, dy:dy + size, dx:dx + size]
            if rng.random() < 0.5:
                x = x.flip(-1)
            loss = F.cross_entropy(model(x.contiguous(memory_format=fmt)), ytr_t[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
        acc = evaluate(model, xte, yte, size, device)
        print(f"epoch {epoch + 1}/{epochs} loss {float(total) / (i + 1):.4f} test top-1 {acc:.2f}% "
              f"({time.time() - t0:.0f}s)", flush=True)
        if state_path is not None:
            _save_state(state_path, settings, epoch + 1, acc, model, opt, sched, rng)
    return model.eval().cpu().to(memory_format=torch.contiguous_format), (acc if end == epochs else None)


def _save_state(path: Path, settings: dict, done: int, acc: float, model: torch.nn.Module,
                opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                rng: np.random.Generator) -> None:
    """Everything the next epoch depends on, written to a temp file and renamed (an interrupted save
    leaves the previous epoch's state intact)."""
    state = {"settings": settings, "epochs_done": done, "test_top1": acc, "model": model.state_dict(),
             "opt": opt.state_dict(), "sched": sched.state_dict(), "numpy_rng": rng.bit_generator.state,
             "torch_rng": torch.get_rng_state()}
    save_torch(state, path)


def _load_state(path: Path, settings: dict, model: torch.nn.Module, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, rng: np.random.Generator) -> tuple[int, float]:
    """Restore a state saved by ``_save_state``; refuse one saved under other settings."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["settings"] != settings:
        diff = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
        raise SystemExit(f"error: {path} was saved by a run with other settings (saved, now: {diff}); "
                         f"delete it or pass the same options")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    return state["epochs_done"], state["test_top1"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, size: int, device: str = "cpu") -> float:
    """Top-1 (%) of ``model`` on raw Fashion-MNIST images."""
    model.eval()
    x = torch.from_numpy(fm.to_model_input(images, size)).to(device)
    pred = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((pred.cpu().numpy() == labels).mean() * 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="repvgg_nano")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--warmup-epochs", type=float, default=None,
                    help="learning-rate warm-up length (default: 15 %% of the run)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--channels-last", action="store_true",
                    help="train in channels-last memory format (about 2x faster for MobileOne on the CPU)")
    ap.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="train at most N more epochs, then exit leaving OUT/train_state.pt to resume from")
    ap.add_argument("--train-images", type=int, default=None, metavar="N",
                    help="train on the first N training images only (smoke runs)")
    args = ap.parse_args()
    if args.stop_after is not None and args.stop_after < 1:
        ap.error("--stop-after must be at least 1")
    if args.train_images is not None and args.train_images < args.batch:
        ap.error(f"--train-images must be at least --batch ({args.batch})")
    channels_last = args.channels_last and channels_last_safe(args.device)
    state_path = args.out / "train_state.pt"
    model, acc = train(args.arch, args.epochs, args.seed, batch=args.batch, device=args.device,
                       warmup_epochs=args.warmup_epochs, lr=args.lr, channels_last=channels_last,
                       state_path=state_path, stop_after=args.stop_after, train_images=args.train_images)
    if acc is None:
        print(f"stopped after --stop-after {args.stop_after} epochs; run the same command again to resume "
              f"from {state_path}", file=sys.stderr)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"arch": args.arch, "num_classes": "10", "in_chans": "1", "input_size": "1,32,32",
            "mean": json.dumps([fm.MEAN]), "std": json.dumps([fm.STD]),
            "dataset": "fashion-mnist", "test_top1": f"{acc:.2f}", "epochs": str(args.epochs),
            "warmup_epochs": "15%" if args.warmup_epochs is None else str(args.warmup_epochs),
            "batch": str(args.batch), "lr": str(args.lr),
            "trained_on": args.device,
            "memory_format": "channels_last" if channels_last else "contiguous"}
    if args.train_images is not None:
        meta["train_images"] = str(args.train_images)
    # temp file + rename: the benchmarks take an existing model.safetensors as a finished training
    with atomic_path(args.out / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    rng = np.random.default_rng(args.seed)
    xtr, _ = fm.load_raw("train")
    xte, yte = fm.load_raw("test")
    calib_idx = rng.choice(len(xtr), 256, replace=False)
    eval_idx = rng.choice(len(xte), 1000, replace=False)
    np.savez_compressed(args.out / "calib.npz", x=fm.to_model_input(xtr[calib_idx]))
    np.savez_compressed(args.out / "eval.npz", x=fm.to_model_input(xte[eval_idx]), y=yte[eval_idx])
    state_path.unlink(missing_ok=True)
    print(f"wrote {args.out}/model.safetensors (test top-1 {acc:.2f}%), calib.npz, eval.npz")


if __name__ == "__main__":
    main()
