"""`dare-pipeline serve`: an OpenAI-compatible HTTP server with streaming and request batching
(docs/serving.md). Needs the `serve` extra: pip install 'dare-pipeline[serve]'."""
