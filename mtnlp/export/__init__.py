"""Deployable forms of a trained multi-task model: one ONNX graph for all heads (`onnx`; its int8
form, kept when it agrees with fp32 on dev data: `quantize`), and plain transformers folders for
one task or the bare encoder (`transformers`)."""
