"""An OpenAI-compatible HTTP server over one engine, batching concurrent requests continuously."""
