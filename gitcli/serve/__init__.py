"""`gitcap serve`: one loaded model behind an OpenAI-compatible HTTP API and a web page.

app: the FastAPI routes; scheduler: the engine's thread and the bridge to asyncio;
images: request images (uploads, data: URLs, fetched URLs) with their limits;
openai_format: OpenAI's chat request and response shapes; metrics: Prometheus;
server: uvicorn with a graceful SIGTERM. Sits beside `infer` (level 5): it uses
`generate`, `model` and `data`, and nothing below imports it.
"""
