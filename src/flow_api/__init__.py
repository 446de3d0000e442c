"""Flow API: an asynchronous LLM job service (BullMQ on Redis/Valkey, LangChain providers)."""
