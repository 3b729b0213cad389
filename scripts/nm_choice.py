"""Choose the default 2:4 method (issue 11 item 5): suite cells with agreement and KL to dense.

Runs the accuracy suite's own functions (`accuracy_suite.prune`, `.recovered`, `.held_out`) for
`nm_<method>` cells at 2:4, zero-shot and after `--recover` epochs for each seed, always fresh
(the stored cell is overwritten), and adds to every record, beside top-1:

- `agreement`: top-1 agreement of the pruned model with the dense model on the held-out split;
- `kl`: mean KL(p_dense ‖ p_sparse) over the held-out images (nats);
- `agreement_zero_shot`, `kl_zero_shot`: the same before recovery.

On 300 val images one image is 0.33 pp of top-1; agreement and KL resolve differences that top-1
cannot. One JSON line per cell goes to stdout (and the cell to the suite's results directory, so
`accuracy_suite.py --doc` shows it).

    python scripts/nm_choice.py --split val --models vit_t resnet26_n \
        --methods nm_magnitude nm_cast nm_obs --recover 0 1 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_suite as suite  # noqa: E402

TARGET = "2:4"


def logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.eval()(b).double() for b in images.split(64)])


def against_dense(dense: torch.Tensor, sparse: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean KL(p_dense ‖ p_sparse) of two logit sets."""
    log_p, log_q = dense.log_softmax(1), sparse.log_softmax(1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1).mean()
    agree = (dense.argmax(1) == sparse.argmax(1)).double().mean()
    return {"agreement": float(agree), "kl": float(kl)}


def run(
    key: str, method: str, compensate: str, recover: list[int], seeds: list[int], split: str
) -> list[dict]:
    torch.set_num_threads(suite.SETTINGS.threads)
    model = suite.load_model(key)
    data = suite.held_out(key, split)
    dense_logits = logits(model.model, data.images)
    dense_top1 = suite.accuracy(model.model, data)
    cpu = time.process_time()
    pruned = suite.prune(key, method, compensate, TARGET, 0)
    cpu = time.process_time() - cpu
    zero_logits = logits(pruned.model, data.images)
    zero = against_dense(dense_logits, zero_logits)
    zero_top1 = float((zero_logits.argmax(1) == data.labels).double().mean())
    base = {
        "model": key,
        "method": method,
        "compensate": compensate,
        "target": TARGET,
        "split": split,
        "metric": model.metric,
        "eval_set": data.description,
        "eval_images": int(len(data.labels)),
        "calib_images": suite.SETTINGS.calib_size,
        "dense_top1": dense_top1,
        "weights_sha256": suite.weights_digest(key),
        "top1_zero_shot": zero_top1,
        "agreement_zero_shot": zero["agreement"],
        "kl_zero_shot": zero["kl"],
        "mac_reduction": pruned.mac_reduction,
        "dense_macs": pruned.dense_macs,
        "pruned_macs": pruned.pruned_macs,
        "params": pruned.params,
        "prune_seconds": round(pruned.seconds, 2),
        "prune_cpu_seconds": round(cpu, 2),
    }
    records = []
    for epochs in recover:
        for seed in seeds if epochs else seeds[:1]:
            record = dict(base, recover_epochs=epochs, seed=seed)
            if epochs:
                start = time.perf_counter()
                recovered, info = suite.recovered(key, pruned, epochs, seed)
                out = logits(recovered, data.images)
                record.update(
                    top1=float((out.argmax(1) == data.labels).double().mean()),
                    recover_seconds=round(time.perf_counter() - start, 1),
                    **against_dense(dense_logits, out),
                    **info,
                )
            else:
                record.update(top1=zero_top1, **zero)
            path = suite.cell_path(key, method, compensate, TARGET, epochs, seed, split)
            records.append(suite._store(path, record))
            print(json.dumps(record), flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="val", choices=suite.SPLITS)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=["nm_magnitude", "nm_cast", "nm_obs"])
    parser.add_argument("--compensate", default="lsq+bn")
    parser.add_argument("--recover", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    for key in args.models:
        for method in args.methods:
            run(key, method, args.compensate, args.recover, args.seeds, args.split)


if __name__ == "__main__":
    main()
