"""Hugging Face Trainer: a tiny randomly initialised GPT-2, radius control in one line.

Offline (the model is built from a config, the data are generated): sequences that count
up modulo the vocabulary from a random start, right-padded to a fixed length with labels
-100 on the padding. ``add_radius_control(trainer, ...)`` is the only ghoststep line;
the Trainer's linear LR schedule keeps working and ``ghoststep/*`` values appear in
``trainer.state.log_history`` (and in TensorBoard with ``--tensorboard``). Padded
positions (label -100) never set the radius.

    python examples/hf_trainer_tiny.py                 # ~10 s on a laptop CPU
    python examples/hf_trainer_tiny.py --steps 5 --out /tmp/hf
    python examples/hf_trainer_tiny.py --tensorboard   # then: tensorboard --logdir runs/hf_tiny
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config, Trainer, TrainingArguments  # noqa: E402

from ghoststep.integrations.transformers import add_radius_control  # noqa: E402

VOCAB, LENGTH, PAD = 64, 24, 0


class CountingData(torch.utils.data.Dataset):
    """``start, start+1, ...`` (mod VOCAB, skipping PAD), random length, padded."""

    def __init__(self, n: int = 512, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(1, VOCAB, (n,), generator=g)
        self.lengths = torch.randint(LENGTH // 2, LENGTH + 1, (n,), generator=g)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        n = int(self.lengths[i])
        ids = torch.full((LENGTH,), PAD)
        ids[:n] = (self.starts[i] - 1 + torch.arange(n)) % (VOCAB - 1) + 1
        labels = ids.clone()
        labels[n:] = -100
        attention = (torch.arange(LENGTH) < n).long()
        return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-2, help="deliberately large for AdamW")
    parser.add_argument("--target-r", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("runs/hf_tiny"))
    parser.add_argument("--tensorboard", action="store_true", help="report to TensorBoard")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=LENGTH,
        bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)  # default (SDPA) attention
    training = TrainingArguments(
        output_dir=str(args.out),
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, args.steps // 10),
        logging_steps=max(1, args.steps // 10),
        report_to=["tensorboard"] if args.tensorboard else "none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = Trainer(model=model, args=training, train_dataset=CountingData(seed=args.seed))
    radius = add_radius_control(trainer, mode="clip", target_r=args.target_r)  # the one line
    trainer.train()

    logs = [h for h in trainer.state.log_history if "ghoststep/tau" in h]
    for h in logs:
        print(
            f"step {h['step']:4d}  loss {h['loss']:.3f}  lr {h['learning_rate']:.2e}  "
            f"r_before_max {h['ghoststep/r_before_max']:6.2f}  "
            f"r_after_max {h['ghoststep/r_after_max']:.2f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    clipped = sum(s.scale < 1 for s in radius.controller.history)
    print(
        f"{len(radius.controller.history)} steps, {clipped} clipped; log history in "
        f"{args.out / 'log_history.json'}; {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
