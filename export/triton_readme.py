"""The README.md inside a Triton model repository: what is in it, how to serve it, how to call it."""

from __future__ import annotations

from mrl.export.triton_plan import Plan

TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"  # Triton 2.51, the release verified with this repository
_PIP = {
    "onnxruntime": "tokenizers 'numpy<2'",
    "tensorrt": "tokenizers 'numpy<2'",
    "python": "mrl-toolkit 'numpy<2'",
}
_ENCODER_TEXT = {
    "onnxruntime": "the profile's ONNX graph (`1/model.onnx` and its weights file) on Triton's ONNX Runtime backend",
    "tensorrt": "TensorRT engines built by `mrl-export build-engine`, one per GPU compute capability "
    "(`cc_model_filenames`); the Triton image must carry the TensorRT version they were built with",
    "python": "a Python-backend model that runs the profile's ONNX graph with `mrl.runtime` "
    "(`1/artifact/`, checked against its sha256 at load)",
}


def _table(plan: Plan) -> str:
    inputs = ", ".join(f"`{i}`" for i in plan.manifest.tokenizer.inputs)
    dtype = plan.tokenize_parameters["ids_dtype"]
    rows = [
        "| model | what |",
        "|---|---|",
        f"| `{plan.tokenize_name}` | Python backend: `TEXT` -> {inputs} ({dtype}), padded per batch |",
    ]
    for p in plan.profiles:
        encoder = f"profile {p.name}: {plan.options.encoder} encoder, `sentence_embedding` [{p.dims}]"
        rows.append(f"| `{plan.encode_name(p)}` | {encoder} |")
        call = f"**call this**: `TEXT` (BYTES, [n, 1]) -> `EMBEDDING` (FP32, [n, {p.dims}])"
        rows.append(f"| `{plan.ensemble_name(p)}` | {call} |")
    return "\n".join(rows)


def repository_readme(plan: Plan) -> str:
    """The README text for one planned repository."""
    b = plan.options.batching
    params = plan.tokenize_parameters
    model = plan.ensemble_name(plan.profiles[-1])
    k8s_name = plan.name.lower().replace("_", "-").replace(".", "-")
    prompts = ", ".join(f"`{k}`" for k in sorted(plan.manifest.prompts)) or "none"
    default_prompt = f"`{params['default_prompt_name']}`" if params["default_prompt_name"] else "none"
    return f"""# {plan.name}: a Triton model repository

Written by `mrl-export triton` from the Matryoshka artifact `{plan.manifest.name}` ({plan.precision},
width {plan.manifest.full_dims}, pooling {plan.manifest.pooling}). Each profile is its own ensemble: the
truncation and L2 re-normalisation are inside the graph, so every `EMBEDDING` row is a unit vector.

{_table(plan)}

Encoders: {_ENCODER_TEXT[plan.options.encoder]}.

Batching (every model's `config.pbtxt`): `max_batch_size` {b.max_batch_size} (texts per request at
most, and per batch), dynamic batching with `max_queue_delay_microseconds` {b.max_queue_delay_us},
{b.instances} instances of the tokenizer and of each encoder. Edit the files to change them.

## Serve

Triton's Python needs {"`mrl-toolkit`" if plan.options.encoder == "python" else "`tokenizers`"} for the
Python-backend models; Triton 2.51's Python backend also needs numpy below 2:

```bash
docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v "$PWD":/models {TRITON_IMAGE} \\
    bash -c "pip install -q {_PIP[plan.options.encoder]} && tritonserver --model-repository=/models"
```

On Kubernetes with KServe, build that image once
(`FROM {TRITON_IMAGE}` + `RUN pip install {_PIP[plan.options.encoder]}`), name it in a
`ServingRuntime` for the `triton` model format, copy this directory to storage, and:

```yaml
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: {k8s_name}
spec:
  predictor:
    model:
      modelFormat:
        name: triton
      runtime: YOUR-TRITON-RUNTIME        # the ServingRuntime with the image above
      storageUri: s3://YOUR-BUCKET/{plan.name}-triton
      resources:
        limits: {{cpu: "2", memory: 4Gi}}  # add nvidia.com/gpu: 1 for GPU encoders
```

## Call

KServe v2 over HTTP (port 8000) or gRPC (port 8001). A request holds `n` texts as `TEXT`, shape
`[n, 1]`, `n` up to {b.max_batch_size}; the answer is `EMBEDDING`, FP32 `[n, dims]`, in input order.

```bash
curl -s localhost:8000/v2/models/{model}/infer -d '{{
  "inputs": [{{"name": "TEXT", "datatype": "BYTES", "shape": [2, 1], "data": ["first text", "second text"]}}],
  "parameters": {{"truncate": false}}
}}'
```

```python
import numpy as np
import tritonclient.grpc as triton  # pip install 'tritonclient[grpc]'

client = triton.InferenceServerClient("localhost:8001")
text = triton.InferInput("TEXT", [2, 1], "BYTES")
text.set_data_from_numpy(np.array([["first text"], ["second text"]], dtype=object))
vectors = client.infer("{model}", [text], parameters={{"truncate": False}}).as_numpy("EMBEDDING")
```

Request parameters (optional): `prompt_name`, one of this model's prompts ({prompts}; default
{default_prompt}, `""` for none), prepended to every text as the model was trained; `truncate`
(default `{params["truncate"]}`): a text over {params["max_length"]} tokens fails its request with a
message saying so unless `truncate` is true, in which case it is cut to {params["max_length"]} tokens.
Other requests in the same batch are unaffected. The defaults live in `{plan.tokenize_name}/config.pbtxt`.
"""
