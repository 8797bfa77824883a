"""The `shitu` command line.

A module per command: `register` adds its parser, `run` does the work. Building the
parser imports no model, runtime or server package (torch, OpenCV, Faiss, onnxruntime,
pydantic, FastAPI), so that `--help`, an argument error and the commands that need none
(`index list`, `index stats`) start at once: what a command needs is imported where it
runs.
"""
