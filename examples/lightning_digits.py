"""Lightning: an ordinary LightningModule on digits, radius control added by one callback.

The module below knows nothing about ghoststep; the Trainer gets
``callbacks=[LightningRadiusCallback(mode="clip", target_r=1.0)]``. The callback wraps the
optimizer (its StepLR keeps working), logs ghoststep/tau, rho_a, r_before, r_after and
scale through the module's loggers (here a CSVLogger), and keeps the controller state in
checkpoints.

    python examples/lightning_digits.py                 # ~15 s on a laptop CPU
    python examples/lightning_digits.py --steps 10 --out /tmp/lit
    ghoststep plot runs/lightning_digits               # reads the CSVLogger's metrics.csv
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ghoststep.integrations.lightning import LightningRadiusCallback


class DigitsClassifier(L.LightningModule):
    """A plain LightningModule: nothing ghoststep-specific in it."""

    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.05, help="deliberately large for Adam")
    parser.add_argument("--target-r", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("runs/lightning_digits"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(args.seed, verbose=False)
    X, y = load_digits(return_X_y=True)  # features / 16, stratified 80/20 split
    X_train, X_test, y_train, y_test = (
        torch.tensor(a) for a in train_test_split(
            (X / 16).astype("float32"), y, test_size=0.2, stratify=y, random_state=args.seed)
    )  # fmt: skip
    train = torch.utils.data.TensorDataset(X_train, y_train)
    test = torch.utils.data.TensorDataset(X_test, y_test)
    loaders = (
        torch.utils.data.DataLoader(train, batch_size=64, shuffle=True),
        torch.utils.data.DataLoader(test, batch_size=360),
    )

    radius = LightningRadiusCallback(mode="clip", target_r=args.target_r)  # the one added line
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        callbacks=[radius],
        logger=CSVLogger(args.out, name="", version=""),
        log_every_n_steps=1,
        val_check_interval=min(args.steps, 20),
        check_val_every_n_epoch=None,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    trainer.fit(DigitsClassifier(lr=args.lr), *loaders)

    history = list(radius.controller.history)
    clipped = sum(s.scale < 1 for s in history)
    last = history[-1]
    print(
        f"{len(history)} steps, {clipped} clipped; last step: r {last.r_before:.2f} -> "
        f"{last.r_after:.2f}, lr {last.lr:.3g}; val_acc "
        f"{float(trainer.callback_metrics['val_acc']):.1%}"
    )
    print(
        f"metrics (ghoststep/* columns) in {Path(trainer.logger.log_dir) / 'metrics.csv'}; "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
