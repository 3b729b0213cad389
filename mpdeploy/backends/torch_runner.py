"""A Polygraphy runner over a PyTorch module, so the reference and the engine share one protocol."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from mpdeploy.export.onnx import INPUT_NAME, OUTPUT_NAME


class TorchRunner(BaseRunner):
    """Runs `model` on CPU (or `device`) in fp32 under `torch.inference_mode`."""

    def __init__(self, model: torch.nn.Module, input_shape, name: str = "pytorch", device="cpu"):
        super().__init__(name=name, prefix="torch-runner")
        self.model = model.eval()
        self.input_shape = tuple(input_shape)
        self.device = torch.device(device)

    def activate_impl(self):
        self.model.to(self.device)

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        meta.add(INPUT_NAME, dtype=np.float32, shape=(-1, *self.input_shape))
        return meta

    def infer_impl(self, feed_dict):
        x = torch.from_numpy(np.ascontiguousarray(feed_dict[INPUT_NAME])).to(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model(x.float())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.inference_time = time.perf_counter() - start
        return OrderedDict([(OUTPUT_NAME, out.float().cpu().numpy())])

    def deactivate_impl(self):
        pass
