"""Train a small CartLorem model from Python on the bundled demo data and evaluate it (< 1 minute).

    python examples/train_from_python.py [DATA.xyz] [--out DIR]

Steps: read the extxyz data into graphs → split into train / validation / test → build a model →
``cartlorem.train.train`` (sets reference energies and normalisation from the training set, keeps
an EMA of the weights, writes model.pt / checkpoint.pt / log.csv to the output folder) →
``cartlorem.evaluate`` on the held-out test structures.
"""

import argparse
import tempfile

import torch

import cartlorem
from cartlorem.data import read_dataset, split
from cartlorem.datasets import demo_path
from cartlorem.evaluate import evaluate, format_table
from cartlorem.train import train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=None, help="extxyz file (default: the bundled demo data)")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary folder)")
    parser.add_argument("--seconds", type=float, default=30.0, help="training time budget in seconds")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a small model on small molecules: one thread is the fastest on a CPU

    cutoff = 5.0
    graphs = read_dataset(args.data or demo_path(), cutoff, dtype=torch.float32)
    rest, test_idx = split(graphs, valid_fraction=0.1, seed=0)
    train_idx, valid_idx = split(len(rest), valid_fraction=0.1, seed=1)
    train_set = [graphs[rest[k]] for k in train_idx]
    valid_set = [graphs[rest[k]] for k in valid_idx]
    test_set = [graphs[k] for k in test_idx]
    species = sorted({int(z) for g in graphs for z in g.species.tolist()})
    print(f"{len(train_set)} train, {len(valid_set)} validation, {len(test_set)} test structures")

    torch.manual_seed(0)
    model = cartlorem.CartLorem(
        species, cutoff=cutoff, long_range=None, channels=16, num_layers=2, correlation=2, radial_hidden=32
    ).float()
    out = args.out or tempfile.mkdtemp(prefix="cartlorem-example-")
    result = train(
        model,
        train_set,
        valid_set,
        epochs=30,
        batch_size=4,
        lr=1e-2,
        out_dir=out,
        overwrite=True,
        max_time=args.seconds,
        seed=0,
    )
    print(
        f"best epoch {result.best_epoch} of {result.epochs_completed} ({result.stop_reason}); files in {out}"
    )

    # `model` now holds the best (EMA) weights; the same model is in out/model.pt
    metrics = evaluate(model, test_set)
    print(format_table(metrics))
    reloaded = cartlorem.load_model(f"{out}/model.pt")
    assert abs(evaluate(reloaded, test_set)["forces_mae_mev_per_a"] - metrics["forces_mae_mev_per_a"]) < 1e-3


if __name__ == "__main__":
    main()
