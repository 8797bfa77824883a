"""The runtimes, precisions and devices an exported model runs with, by name: plain values
that the command line offers without loading any runtime (see `shitu.inference.backends`)."""

BACKENDS = ("auto", "onnxruntime", "openvino", "torch")
PRECISIONS = ("fp32", "int8", "fp16", "bf16")
DEVICES = ("cpu", "cuda")
# PaddleClas's name for a CUDA GPU, which Global.device takes too (and the API, for it).
DEVICE_ALIASES = {"gpu": "cuda"}
