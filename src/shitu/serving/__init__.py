"""`shitu serve`: recognition, embedding and gallery editing over HTTP, plus a web page.

Needs the `serve` extra (FastAPI, uvicorn). Nothing in shitu but the `shitu serve` command
imports this package: it sits on top of the pipeline, the gallery library and the inference
code. Entry points:
`shitu.serving.service.RecognitionService` (the loaded models and library) and
`shitu.serving.app.create_app` (the HTTP application around one).
"""
