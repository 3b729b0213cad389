"""Worker for tests/test_recover_ddp.py: recover() under torchrun on CPU (gloo), saves each rank."""

import copy
import json
import os
import sys

import torch
from safetensors.torch import save_file

from mpdeploy.models import create_model
from mpdeploy.prune.recover import RecoverConfig, recover

torch.set_num_threads(1)
lm = create_model("demo")
student = copy.deepcopy(lm.model)
with torch.no_grad():
    student.blocks[0].mlp.fc2.weight.mul_(0.5)
g = torch.Generator().manual_seed(123)
masks = {
    "blocks.1.mlp.fc1.weight": torch.rand(student.blocks[1].mlp.fc1.weight.shape, generator=g) > 0.5
}
with torch.no_grad():
    student.blocks[1].mlp.fc1.weight.mul_(masks["blocks.1.mlp.fc1.weight"])
r = recover(
    student,
    lm.model,
    "demo",
    lm.data_config,
    RecoverConfig(epochs=1, seed=0, max_steps=6, eval_images=64, batch_size=32),
    masks=masks,
)
w = r.model.state_dict()["blocks.1.mlp.fc1.weight"]
assert not w[~masks["blocks.1.mlp.fc1.weight"]].any(), "mask leaked"
rank = int(os.environ.get("RANK", "0"))
state = {k: v.contiguous() for k, v in r.model.state_dict().items()}
save_file(state, os.path.join(sys.argv[1], f"rank{rank}.safetensors"))
facts = {
    "rank": rank,
    "world": os.environ.get("WORLD_SIZE"),
    "steps": r.record["steps"],
    "loss": r.record["loss_last_step"],
}
# a file per rank: the two ranks share one stdout, and unbuffered prints interleave there
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as out:
    json.dump(facts, out)
