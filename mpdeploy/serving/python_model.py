"""Triton python-backend model that runs the `model.onnx` beside it with ONNX Runtime on CPU.

mpdeploy copies this file as `<version>/model.py`. It depends only on numpy, onnxruntime and
Triton's `triton_python_backend_utils`, so it runs in the server's python stub unchanged.
Requests that the dynamic batcher delivers together run as one ONNX Runtime batch.
"""

import json
from pathlib import Path

import numpy as np


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort
        import triton_python_backend_utils as pb_utils

        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        threads = config.get("parameters", {}).get("intra_op_thread_count", {})
        if threads.get("string_value"):
            options.intra_op_num_threads = int(threads["string_value"])
        self.session = ort.InferenceSession(
            str(version_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i["name"] for i in config["input"]]
        self.output_types = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]
        }

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        feeds = [
            {
                name: pb_utils.get_input_tensor_by_name(r, name).as_numpy()
                for name in self.input_names
            }
            for r in requests
        ]
        try:
            per_request = run_batched(self.session, feeds, list(self.output_types))
        except Exception as exc:  # one failed batch answers each of its requests with the error
            error = pb_utils.TritonError(f"onnxruntime: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(
                        name, np.ascontiguousarray(value, dtype=self.output_types[name])
                    )
                    for name, value in outputs.items()
                ]
            )
            for outputs in per_request
        ]

    def finalize(self):
        self.session = None


def run_batched(session, feeds, output_names):
    """Run several requests' feeds as one batch and split the outputs back per request."""
    sizes = [len(next(iter(feed.values()))) for feed in feeds]
    batch = {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}
    outputs = session.run(output_names, batch)
    bounds = np.cumsum(sizes)[:-1]
    split = [np.split(value, bounds) for value in outputs]
    return [{name: split[j][i] for j, name in enumerate(output_names)} for i in range(len(feeds))]
