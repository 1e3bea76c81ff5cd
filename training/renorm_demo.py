"""The renorm experiment offline (``python -m training.renorm_demo --out DIR``, docs/renorm.md): resnet18 trained
here on Fashion-MNIST (upsampled, 3 channels) under ImageNet's normalization, saved as a checkpoint, then
re-evaluated by the renorm job on held-out test images written as PNG class folders."""

from __future__ import annotations

from pathlib import Path

import click
import mlflow
import torch
from torch import nn
from zoo.progress import tqdm  # plain lines when stderr is no terminal

from training.engine import EpochResult, evaluate, make_optimizer, train_one_epoch
from training.epochs import BestEpoch
from zoo.access import masked_url
from zoo.data import Dataset, Split, load_dataset
from zoo.normalization import Normalization, parse_spec
from zoo.models.registry import create_model


def as_rgb(split: Split, size: int) -> Split:
    """Grayscale uint8 [N, 1, H, W] -> [N, 3, size, size], resized bilinearly as the renorm job's decoder does."""
    from torchvision.transforms import functional as F

    images = F.resize(split.images, [size], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return Split(images.expand(-1, 3, -1, -1).contiguous(), split.labels)


def train_small_resnet(dataset: Dataset, normalization: Normalization, *, train_images: int = 6000, epochs: int = 1,
                       size: int = 32, batch_size: int = 64, lr: float = 1e-3, seed: int = 0, patience: int | None = None,
                       val_images: int = 1000, device: str = "cpu") -> tuple[nn.Module, float]:
    """resnet18 trained with the project's loop, and its val accuracy; with ``patience``, the lr halves after an epoch
    without a better val accuracy, training stops after ``patience`` such and keeps the best."""
    torch.manual_seed(seed)
    target = torch.device(device)
    network = create_model("resnet18", num_classes=len(dataset.classes)).to(target)
    optimizer = make_optimizer("adam", network.parameters(), lr)
    train, val = (Split(s.images.to(target), s.labels.to(target))
                  for s in (as_rgb(dataset.train.subset(train_images), size), as_rgb(dataset.val.subset(val_images), size)))
    generator = torch.Generator().manual_seed(seed)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=0)
    best = BestEpoch()
    with tqdm(total=epochs * len(train), unit="img", desc="training resnet18", leave=False) as bar:
        for epoch in range(1, epochs + 1):
            train_one_epoch(network, optimizer, train, normalization, batch_size, generator, on_batch=bar.update)
            if patience is None:
                continue
            _, accuracy = evaluate(network, val, normalization, batch_size=250)
            tqdm.write(f"epoch {epoch}: val accuracy {accuracy:.4f}")
            plateau.step(accuracy)  # an epoch without improvement halves the learning rate
            if not best.update(EpochResult(epoch, 0.0, 0.0, accuracy), network) and epoch - best.epoch >= patience:
                break
    if best.state is not None:
        network.load_state_dict(best.state)
    _, val_accuracy = evaluate(network, val, normalization, batch_size=250)
    return network.cpu().eval(), val_accuracy


def save_checkpoint(network: nn.Module, normalization: Normalization, class_names: list[str], path: Path) -> Path:
    """The checkpoint layout zoo.pretrained reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": network.state_dict(), "normalization": normalization.to_dict(), "class_names": class_names}, path)
    return path


def write_image_folder(split: Split, class_names: list[str], root: Path) -> Path:
    """One folder per class (``/`` in a class name becomes ``_``), one PNG per image."""
    from PIL import Image

    for i, (image, label) in enumerate(zip(split.images, split.labels)):
        folder = root / class_names[int(label)].replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i:05d}.png")
    return root


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="renorm-demo", show_default=True)
@click.option("--train-images", type=click.IntRange(min=100), default=6000, show_default=True)
@click.option("--test-images", type=click.IntRange(min=20), default=2000, show_default=True,
              help="Fashion-MNIST test images written as PNG (calibration images are split off them).")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Epochs (the most, with --patience).")
@click.option("--patience", type=click.IntRange(min=1), default=None,
              help="Train to convergence: stop after N epochs without a better val accuracy, keep the best epoch.")
@click.option("--val-images", type=click.IntRange(min=100), default=1000, show_default=True)
@click.option("--size", type=click.IntRange(min=16), default=32, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (training and re-evaluation).")
@click.option("--train-norm", default="imagenet", show_default=True, help="The normalization the network is trained with.")
@click.option("--grid-steps", type=click.IntRange(min=0), default=7, show_default=True)
@click.option("--calibration", type=click.IntRange(min=2), default=500, show_default=True)
@click.option("--register", default=None, help="Register the fold-adapted model under 0:1 as NAME.")
def main(out_dir, train_images, test_images, epochs, patience, val_images, size, device, train_norm, grid_steps,
         calibration, register) -> None:
    from training.renorm import RenormConfig, renorm

    out = Path(out_dir)
    dataset = load_dataset("fashion-mnist")
    normalization = parse_spec(train_norm, 3)
    network, val_accuracy = train_small_resnet(dataset, normalization, train_images=train_images, epochs=epochs, size=size,
                                               patience=patience, val_images=val_images, device=device)
    click.echo(f"resnet18 trained on {train_images} Fashion-MNIST images (at most {epochs} epoch(s), {size}x{size}, "
               f"{normalization}): val accuracy {val_accuracy:.4f} on {val_images} images", err=True)
    checkpoint = save_checkpoint(network, normalization, dataset.classes, out / "resnet18-fashion.pt")
    images = write_image_folder(dataset.test.subset(test_images), dataset.classes, out / "test-images")
    grid = (-3.0, 3.0, grid_steps), (0.05, 1.0, grid_steps)
    config = RenormConfig(
        data=str(images), model="resnet18", weights=str(checkpoint), norms=["imagenet", "0.5:0.5", "0:1"],
        grid_mean=grid[0], grid_std=grid[1], adaptations=["none", "bn-recalibrate", "fold"], calibration=calibration,
        resize=size, crop=size, workers=0, register=register, register_norm="0:1" if register else None, device=device,
    )
    result = renorm(config, run_name="renorm resnet18 fashion-mnist demo")
    click.echo(f"parent run {result.parent_run_id} in {masked_url(mlflow.get_tracking_uri())}")
    click.echo("| normalization | none | bn-recalibrate | fold | fold agreement | fold max logit diff |")
    click.echo("|---|---|---|---|---|---|")
    for label in config.norms:
        row = {r["adaptation"]: r for r in result.rows if r["normalization"] == label}
        click.echo(f"| {label} | " + " | ".join(f"{row[a]['top1']:.4f}" for a in config.adaptations)
                   + f" | {row['fold']['agreement']:.4f} | {row['fold']['max_abs_logit_diff']:.2g} |")
    for adaptation in config.adaptations:
        cells = [r for r in result.rows if r["adaptation"] == adaptation and r["grid_mean"] is not None]
        if cells:
            top1 = sorted(r["top1"] for r in cells)
            click.echo(f"grid ({len(cells)} cells), {adaptation}: median top-1 {top1[len(top1) // 2]:.4f}, min {top1[0]:.4f}, "
                       f"max {top1[-1]:.4f}; agreement min {min(r['agreement'] for r in cells):.4f}, "
                       f"max logit diff {max(r['max_abs_logit_diff'] for r in cells):.2g}")
    if result.model_uri:
        click.echo(f"registered: models:/{register} ({result.model_uri})")


if __name__ == "__main__":
    main()
