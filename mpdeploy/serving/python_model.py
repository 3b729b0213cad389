"""Triton python-backend model that runs the artifact beside it on CPU: ONNX Runtime by default.

mpdeploy copies this file as `<version>/model.py`. It depends only on numpy, the runtime it runs
(onnxruntime, or openvino) and Triton's `triton_python_backend_utils`, so it runs in the server's
python stub unchanged. The config's parameters `mpdeploy_runner` (`onnxruntime` | `openvino`) and
`mpdeploy_model_file` (default `model.onnx`) choose the runtime and the file; `mpdeploy serve`'s
overlay sets them from the platform the published config names. Requests that the dynamic batcher
delivers together run as one batch.
"""

import json
from pathlib import Path

import numpy as np


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.session = open_session(version_dir, config_parameters(config))
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
            error = pb_utils.TritonError(f"{self.session.runtime}: {exc}")
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


def config_parameters(config):
    """The config's `parameters` as plain strings."""
    return {
        key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()
    }


def open_session(version_dir, parameters):
    """A session with `run(output_names, feeds)` for the runtime the parameters name."""
    runtime = parameters.get("mpdeploy_runner") or "onnxruntime"
    model_file = Path(version_dir) / (parameters.get("mpdeploy_model_file") or "model.onnx")
    if runtime == "onnxruntime":
        return OnnxRuntimeSession(model_file, parameters)
    if runtime == "openvino":
        return OpenVinoSession(model_file, parameters)
    raise ValueError(f"mpdeploy_runner {runtime!r}: expected 'onnxruntime' or 'openvino'")


class OnnxRuntimeSession:
    runtime = "onnxruntime"

    def __init__(self, model_file, parameters):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if parameters.get("intra_op_thread_count"):
            options.intra_op_num_threads = int(parameters["intra_op_thread_count"])
        self._session = ort.InferenceSession(
            str(model_file), options, providers=["CPUExecutionProvider"]
        )

    def run(self, output_names, feeds):
        return self._session.run(output_names, feeds)


class OpenVinoSession:
    """OpenVINO on CPU. Parameters named like a CPU property (`INFERENCE_PRECISION_HINT`,
    `INFERENCE_NUM_THREADS`, …) are passed to it; other keys (Triton openvino-backend options such
    as `SKIP_OV_DYNAMIC_BATCHSIZE`) are not OpenVINO's and are left out."""

    runtime = "openvino"

    def __init__(self, model_file, parameters):
        import openvino as ov

        core = ov.Core()
        supported = set(core.get_property("CPU", "SUPPORTED_PROPERTIES"))
        properties = {k: v for k, v in parameters.items() if k in supported and v}
        self._compiled = core.compile_model(str(model_file), "CPU", properties)

    def run(self, output_names, feeds):
        results = self._compiled.create_infer_request().infer(feeds)
        by_name = {port.any_name: value for port, value in results.items()}
        return [by_name[name] for name in output_names]


def run_batched(session, feeds, output_names):
    """Run several requests' feeds as one batch and split the outputs back per request."""
    sizes = [len(next(iter(feed.values()))) for feed in feeds]
    batch = {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}
    outputs = session.run(output_names, batch)
    bounds = np.cumsum(sizes)[:-1]
    split = [np.split(value, bounds) for value in outputs]
    return [{name: split[j][i] for j, name in enumerate(output_names)} for i in range(len(feeds))]
