"""The OpenAI-compatible server: the HTTP API (openai_api), its wire format (protocol), media URLs (media_urls),
the batching scheduler (scheduler) and the rows it decodes together (decoding)."""
