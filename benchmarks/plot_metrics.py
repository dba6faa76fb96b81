"""Plot a `mellow train` run's curve from its metrics.jsonl: training loss, held-out loss and
held-out accuracy against chance. Needs matplotlib (not a dependency of mellow-cli).

    python benchmarks/plot_metrics.py runs/tiny/metrics.jsonl --chance 0.4375 -o docs/training-curve.png
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics")
    ap.add_argument("--chance", type=float, default=None, help="chance accuracy, drawn as a line")
    ap.add_argument("-o", "--output", default="training-curve.png")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(args.metrics, encoding="utf-8")]
    train = [(r["step"], r["loss"]) for r in rows if r.get("event") == "train"]
    val = [(r["step"], r["val_loss"], r.get("val_accuracy")) for r in rows if r.get("event") == "val"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(*zip(*train), label="training loss", lw=1)
    left.plot([v[0] for v in val], [v[1] for v in val], "o-", label="held-out loss")
    left.set(xlabel="step", ylabel="cross-entropy per answer token", yscale="log")
    left.legend()
    right.plot([v[0] for v in val], [v[2] for v in val], "o-", label="held-out accuracy")
    if args.chance is not None:
        right.axhline(args.chance, color="grey", ls="--", label=f"chance ({args.chance:.3f})")
    right.set(xlabel="step", ylabel="accuracy (likelihood over the choices)", ylim=(0, 1))
    right.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(args.output)


if __name__ == "__main__":
    main()
