"""efficientnet-lite0 (real ImageNet weights): label-free recovery on the calibration photos, held-out
agreement along the way.

The student is the accuracy suite's lite0 pruned by METHOD at TARGET (`accuracy_suite.prune`:
"nm_magnitude"/"nm_obs"/… with "2:4", or a structured criterion with 0.3) with COMP. It is
distilled from the dense model with recovery's own pieces (`prune/recover.py`: τ²·KL only, AdamW,
warm-up + cosine over STEPS, BatchNorm statistics frozen, N:M masks re-applied) on DATA:

- `stream`: fresh random crops of the 14 calibration photos every step
  (`mpdeploy.data.calibration.PhotoCropStream` over `lite0_calibration.WIDE_PHOTOS`);
- `fixed`: the suite's 128 fixed calibration crops, reshuffled (what recovery did before).

MIX=mixup|cutmix blends each crop of a batch with another one of it (teacher and student see the
same blend); MIX=none (default) feeds the crops as they are.

Every EVAL steps: top-1 agreement with dense on the split's held-out crops, and the KL there.
One JSON line per evaluation on stdout and in $OUT/log.jsonl.

    OUT=/tmp/l0rec METHOD=nm_magnitude TARGET=2:4 STEPS=400 EVAL=50 DATA=stream \
        nice -n 19 .venv/bin/python scripts/lite0_recover.py
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import accuracy_suite as suite  # noqa: E402
import torch  # noqa: E402
from lite0_calibration import jsonl_emitter  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/lite0_recover"))
METHOD = os.environ.get("METHOD", "nm_magnitude")
TARGET = os.environ.get("TARGET", "2:4")
COMP = os.environ.get("COMP", "lsq+bn")
STEPS = int(os.environ.get("STEPS", "400"))
EVAL = int(os.environ.get("EVAL", "50"))
BATCH = int(os.environ.get("BATCH", "16"))
LR = float(os.environ.get("LR", "3e-4"))
DATA = os.environ.get("DATA", "stream")
SPLIT = os.environ.get("SPLIT", "val")
SEED = int(os.environ.get("SEED", "0"))
MIX = os.environ.get("MIX", "none")  # none | mixup | cutmix: teacher and student see the same mix
torch.set_num_threads(int(os.environ.get("THREADS", "1")))

emit = jsonl_emitter(OUT)


def mix(images: torch.Tensor, how: str, generator: torch.Generator) -> torch.Tensor:
    """Each image blended with another of the batch (mixup, weight ~ U(0, 1)) or with a box of it
    pasted in (cutmix): new inputs for function matching, same for teacher and student."""
    if how == "none":
        return images
    partner = images[torch.randperm(len(images), generator=generator)]
    lam = torch.rand(len(images), generator=generator)
    if how == "mixup":
        return lam.view(-1, 1, 1, 1) * images + (1 - lam.view(-1, 1, 1, 1)) * partner
    out = images.clone()
    h, w = images.shape[-2:]
    for i, share in enumerate(lam.tolist()):
        bh, bw = int(h * share**0.5), int(w * share**0.5)
        y = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
        x = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
        out[i, :, y : y + bh, x : x + bw] = partner[i, :, y : y + bh, x : x + bw]
    return out


def main() -> None:
    from lite0_calibration import photo_paths
    from PIL import Image

    from mpdeploy.data.calibration import PhotoCropStream
    from mpdeploy.prune.recover import (
        RecoverConfig,
        TensorImages,
        _apply_masks,
        kd_loss,
        param_groups,
        warmup_cosine,
    )

    key = suite.EFFNET
    lite0 = suite.load_model(key)
    teacher = lite0.model.eval()
    held = suite.held_out(key, SPLIT)
    target = TARGET if ":" in TARGET else float(TARGET)
    start = time.perf_counter()
    pruned = suite.prune(key, METHOD, COMP, target, 0)
    student = copy.deepcopy(pruned.model)
    masks = pruned.masks or {}
    params = dict(student.named_parameters())

    def evaluate(step: int, seconds: float) -> None:
        student.eval()
        with torch.no_grad():
            out = torch.cat([student(b) for b in held.images.split(48)])
            ref = torch.cat([teacher(b) for b in held.images.split(48)])
        kl = torch.nn.functional.kl_div(
            out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean"
        )
        emit(step=step, method=METHOD, target=TARGET, compensate=COMP, data=DATA, batch=BATCH, mix=MIX,
             lr=LR, steps=STEPS, split=SPLIT, seed=SEED, seconds=round(seconds, 1),
             agree=round(float((out.argmax(1) == held.labels).double().mean()), 4),
             kl=round(float(kl), 4))  # fmt: skip

    evaluate(0, time.perf_counter() - start)
    if DATA == "stream":
        photos = [Image.open(p).convert("RGB") for p in photo_paths()]
        dataset = PhotoCropStream(photos, lite0.data_config, length=10**9, seed=SEED)
    else:
        dataset = TensorImages(suite.calibration(key))
    config = RecoverConfig(lr=LR, seed=SEED)
    torch.manual_seed(SEED)
    optimizer = torch.optim.AdamW(param_groups(student, config.weight_decay), lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(STEPS, config))
    generator = torch.Generator().manual_seed(SEED)
    step = 0
    while step < STEPS:
        order = torch.randperm(len(dataset) if DATA != "stream" else STEPS * BATCH,
                               generator=generator)  # fmt: skip
        for first in range(0, len(order) - BATCH + 1, BATCH):
            if step >= STEPS:
                break
            student.train()
            for m in student.modules():  # frozen BatchNorm statistics, as recover on calibration
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
            images = torch.stack([dataset[int(i)][0] for i in order[first : first + BATCH]])
            images = mix(images, MIX, generator)
            labels = torch.full((BATCH,), -1)
            with torch.no_grad():
                teacher_logits = teacher(images)
            loss = kd_loss(student(images), teacher_logits, labels, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
            _apply_masks(student, masks, params)
            step += 1
            if step % EVAL == 0 or step == STEPS:
                evaluate(step, time.perf_counter() - start)


if __name__ == "__main__":
    main()
